"""Acquire one real dataset (coco, f30k) from its ``datasets.{ds}.download`` config block.

Steps, each safe to interrupt and rerun:

1. the Karpathy JSON: fetched (or taken from a local path), then either used as is or extracted
   from an archive (``member``, e.g. ``dataset_coco.json`` from ``caption_datasets.zip``) to
   ``datasets.{ds}.json``;
2. the images: every entry of ``download.images`` is a URL (fetched to ``download.cache``), a local
   archive (``.zip`` / ``.tar.gz``, used in place) or an unpacked folder. Archives are extracted
   safely (:mod:`itmatch.data.archives`) into a temporary folder renamed to ``datasets.{ds}.images``
   when complete; a single unpacked folder becomes a symlink (nothing is copied), several folders
   are linked side by side (each entry by its own path: a link inside the user's folder is not followed
   or resolved, and nothing is ever copied out of a folder source);
3. every image the JSON references is checked (:mod:`itmatch.data.image_check`): the list of bad
   ones goes to ``resources/{ds}/bad_images.txt`` and the run fails unless ``on_bad_image: drop``;
4. a marker (``resources/{ds}/.verified``: the sources with sizes and digests, image counts) is
   written last; it is the rule's last output.

``root`` of an image entry selects a folder inside the archive (or folder) whose content is the image
folder, e.g. ``flickr30k-images``; for a folder source it is used when it exists there.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from itmatch.config import schema_defaults
from itmatch.data.archives import ArchiveError, archive_kind, extract, extract_member
from itmatch.data.download import (
    DownloadError,
    Expected,
    RetryPolicy,
    fetch,
    file_name,
    is_remote,
    local_path,
    sidecar,
    verified_record,
    verify_local,
)
from itmatch.data.image_check import check_images
from itmatch.data.ingest import iter_karpathy_json
from itmatch.utils.io import atomic_path, remove_stale, write_json
from itmatch.utils.logs import log


class AcquireError(ValueError):
    """The download config cannot be satisfied; the message names the config key."""


def _expected(entry: dict[str, Any]) -> Expected:
    return Expected(size=entry.get("size"), sha256=entry.get("sha256"), md5=entry.get("md5"))


def obtain(entry: dict[str, Any], key: str, cache: Path, policy: RetryPolicy) -> tuple[Path, bool, dict | None]:
    """The local path of one source entry (fetched if remote), whether it was downloaded, and its
    verification record (size, digests; None for folders and unchecked local files)."""
    url = entry.get("url")
    if not url:
        hint = entry.get("hint") or "set it to a URL, a local archive or an unpacked folder"
        raise AcquireError(f"config key {key}.url is not set: {hint}")
    if is_remote(url):
        dest = cache / (entry.get("name") or file_name(url))
        fetch(url, dest, _expected(entry), policy)
        return dest, True, verified_record(dest)
    path = local_path(url)
    if path.is_dir():
        return path, False, None
    if not path.exists():
        raise AcquireError(f"config key {key}.url: local path {path} does not exist (cwd {Path.cwd()})")
    path, info = verify_local(path, _expected(entry))
    return path, False, info


def acquire_json(spec: dict[str, Any], out: Path, cache: Path, policy: RetryPolicy, key: str) -> dict[str, Any]:
    """Fetch / extract the Karpathy JSON to ``out``; return its provenance record."""
    src, downloaded, verified = obtain(spec, key, cache, policy)
    member = spec.get("member")
    remove_stale(out)
    if member:
        extract_member(src, member, out)
    elif src.is_dir():
        raise AcquireError(f"config key {key}.url: {src} is a folder; give the JSON file or an archive + member")
    elif archive_kind(src) is not None and src.suffix.lower() != ".json":
        raise AcquireError(f"config key {key}.member: {src} is an archive; name the JSON file inside it")
    elif src.resolve() != out.resolve():
        with atomic_path(out) as tmp:
            shutil.copyfile(src, tmp)
    n = sum(1 for _ in iter_karpathy_json(out))
    log.info("%s: Karpathy JSON with %d images", out, n)
    return {"url": spec.get("url"), "path": str(src), "member": member, "downloaded": downloaded,
            "verified": verified, "images_in_json": n}


def acquire_images(entries: list[dict[str, Any]], out: Path, cache: Path, policy: RetryPolicy,
                   key: str) -> list[dict[str, Any]]:
    """Fetch and extract (or link) the image sources to the folder ``out``; return provenance records."""
    if not entries:
        raise AcquireError(f"config key {key}: no image sources configured")
    sources = []
    for i, entry in enumerate(entries):
        sources.append((entry, *obtain(entry, f"{key}[{i}]", cache, policy)))
    remove_stale(out)
    if out.is_symlink():
        out.unlink()
    records = []
    with atomic_path(out) as tmp:
        folders = [(e, p) for e, p, _, _ in sources if p.is_dir()]
        if len(sources) == 1 and folders:
            entry, path = folders[0]
            target = Path(os.path.abspath(_folder_root(path, entry.get("root"))))  # abspath: links not followed
            os.symlink(target, tmp, target_is_directory=True)
            log.info("%s: linked to the unpacked folder %s", out, target)
        else:
            tmp.mkdir(parents=True)
            for entry, path, _, _ in sources:
                if path.is_dir():
                    target = _folder_root(path, entry.get("root"))
                    for child in sorted(target.iterdir()):
                        if (tmp / child.name).exists():
                            raise AcquireError(f"{child} clashes with {tmp / child.name} from another source")
                        os.symlink(os.path.abspath(child), tmp / child.name)  # the entry, links not followed
                    log.info("%s: linked the entries of the unpacked folder %s", out, target)
                else:
                    n = extract(path, tmp, entry.get("root"))
                    log.info("%s: %d files extracted into %s", path, n, out)
        for entry, path, downloaded, verified in sources:
            records.append({"url": entry.get("url"), "path": str(path), "root": entry.get("root"),
                            "downloaded": downloaded, "verified": verified})
    return records


def _folder_root(path: Path, root: str | None) -> Path:
    if root and (path / root).is_dir():
        return path / root
    return path


def acquire(dataset: str, download: dict[str, Any], json_out: str | Path, images_out: str | Path,
            marker: str | Path, report: str | Path, on_bad_image: str = "error", processes: int = 1) -> dict:
    """Run all steps for one dataset (see the module docstring); return the marker's content."""
    json_out, images_out, marker = Path(json_out), Path(images_out), Path(marker)
    t0 = time.time()
    key = f"datasets.{dataset}.download"
    download = {**schema_defaults("$defs.download"), **download}  # the schema: the one home of the defaults
    cache = Path(download["cache"])
    # digests of everything downloaded, recorded the first time (resources/downloads.lock.json by default)
    policy = RetryPolicy.from_config(download, lock=cache.with_name(cache.name + ".lock.json"))
    try:
        rec_json = acquire_json(download["json"], json_out, cache, policy, f"{key}.json")
        rec_images = acquire_images(download["images"], images_out, cache, policy, f"{key}.images")
    except (DownloadError, ArchiveError) as e:
        raise AcquireError(f"{dataset}: {e}") from e
    bad = check_images(json_out, images_out, report, download["verify_images"], on_bad_image,
                       processes)
    if not download["keep_archives"]:
        for rec in (rec_json, *rec_images):
            if rec["downloaded"]:
                p = Path(rec["path"])
                log.info("removing %s (keep_archives: false)", p)
                p.unlink(missing_ok=True)
                sidecar(p).unlink(missing_ok=True)
    info = {"dataset": dataset, "json": str(json_out), "images": str(images_out), "json_source": rec_json,
            "image_sources": rec_images, "images_in_json": rec_json["images_in_json"], "bad_images": len(bad),
            "bad_images_report": str(report), "on_bad_image": on_bad_image,
            "verify_images": download["verify_images"], "seconds": round(time.time() - t0, 1)}
    write_json(marker, info)
    log.info("%s: acquired in %.0f s (%d images in the JSON, %d bad)", dataset, info["seconds"],
             info["images_in_json"], len(bad))
    return info
