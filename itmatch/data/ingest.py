"""Ingest, shared by all datasets: Karpathy-format JSON + image folder → ``images.parquet`` and
``captions.parquet`` (the artifact contract in ``docs/contract.md``).

Row order: images grouped by split (train, val, test), JSON order inside a split; captions in the
same order, exactly ``captions_per_image`` per image, so that within a split captions
``5i..5i+4`` belong to that split's image ``i``. COCO's ``restval`` counts as ``train``.
"""

from __future__ import annotations

import json
import multiprocessing as mp
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import pandas as pd
import pyarrow as pa
from PIL import Image

from itmatch.utils.io import write_parquet
from itmatch.utils.jsonstream import Unstreamable, stream_array
from itmatch.utils.logs import log, progress

SPLITS = ("train", "val", "test")
IMAGES_SCHEMA = pa.schema([("image_id", pa.int64()), ("split", pa.string()), ("file", pa.string()),
                           ("width", pa.int32()), ("height", pa.int32())])
CAPTIONS_SCHEMA = pa.schema([("caption_id", pa.int64()), ("image_id", pa.int64()), ("split", pa.string()),
                             ("text", pa.string())])
T = TypeVar("T")
R = TypeVar("R")


class IngestError(ValueError):
    """The dataset's JSON or images are not usable; the message names the file and entry."""


@dataclass
class IngestOptions:
    captions_per_image: int = 5
    on_bad_caption_count: str = "error"  # or "drop"
    truncate_extra_captions: bool = False  # COCO has a few images with 6-7 captions: True keeps the first 5
    restval_as_train: bool = True
    verify_images: str = "decode"  # "decode" (full decode), "header" (size only)
    on_bad_image: str = "error"  # or "drop"

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> IngestOptions:
        return cls(**cfg)


def _json_error(path: Path, e: BaseException) -> IngestError:
    if isinstance(e, json.JSONDecodeError):
        return IngestError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}")
    if isinstance(e, UnicodeDecodeError):
        return IngestError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); JSON files must be UTF-8")
    return IngestError(f"{path}: JSON nested too deeply to read")


def iter_karpathy_json(path: str | Path) -> Iterator[dict[str, Any]]:
    """The ``images`` entries of a Karpathy-format JSON, one at a time (COCO's file is never held whole), with a
    clear error for malformed files. The file is read twice: once to check it all (so no entry is handed out of a
    file that turns out malformed), once to hand out the entries; a file of another layout is read whole."""
    path = Path(path)
    if not path.exists():
        raise IngestError(f"{path}: dataset JSON not found")
    try:
        for _ in stream_array(path, "images"):
            pass
        streamable = True
    except (Unstreamable, UnicodeDecodeError, RecursionError):
        streamable = False
    if streamable:
        yield from stream_array(path, "images")
        return
    try:  # not the plain layout: the standard reader, for its result or its error message
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise _json_error(path, e) from e
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise IngestError(f"{path}: expected an object with an 'images' list (Karpathy format)")
    yield from data["images"]


def read_karpathy_json(path: str | Path) -> list[dict[str, Any]]:
    """The ``images`` list of a Karpathy-format JSON (:func:`iter_karpathy_json`, whole)."""
    return list(iter_karpathy_json(path))


INT64 = (-(2 ** 63), 2 ** 63 - 1)  # ids are stored as int64


def _label(entry: dict[str, Any]) -> str:
    """The entry's filename for messages (``?`` when it has none usable)."""
    name = entry.get("filename")
    return name if isinstance(name, str) and name.isprintable() and len(name) < 200 else "?"


def _kind(value: Any) -> str:
    """``null``, ``boolean true``, ``float 0.7``, ... for messages about a wrong type."""
    if value is None:
        return "null"
    name = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list",
            dict: "object"}.get(type(value), type(value).__name__)
    text = json.dumps(value, ensure_ascii=True) if isinstance(value, (bool, int, float, str)) else ""
    return f"{name} {text[:60]}".strip()


def _entry_field(path: Path, i: int, entry: dict[str, Any], key: str) -> Any:
    if key not in entry:
        raise IngestError(f"{path}: images[{i}] ({_label(entry)}) has no '{key}' field")
    return entry[key]


def _string(path: Path, where: str, value: Any, key: str) -> str:
    """``value`` if it is a string that can be stored (valid Unicode), else an error naming ``where`` and ``key``."""
    if not isinstance(value, str):
        raise IngestError(f"{path}: {where} field '{key}' must be a string, got {_kind(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise IngestError(f"{path}: {where} field '{key}' is not valid Unicode text (a lone surrogate "
                          f"{value.encode('utf-8', 'backslashreplace')[:60]!r})") from None
    return value


def _integer(path: Path, where: str, value: Any, key: str) -> int:
    """``value`` if it is a JSON integer that fits int64 (not a boolean, not 0.7), else a named error."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise IngestError(f"{path}: {where} field '{key}' must be an integer, got {_kind(value)}")
    if not INT64[0] <= value <= INT64[1]:
        raise IngestError(f"{path}: {where} field '{key}' is out of the 64-bit integer range ({_kind(value)})")
    return value


def image_id_of(entry: dict[str, Any], path: Path | str = "dataset JSON", i: int = 0) -> int:
    """COCO's ``cocoid`` when present, else the JSON's ``imgid`` (an integer; else :class:`IngestError`)."""
    key = "cocoid" if "cocoid" in entry else "imgid"
    if key not in entry:
        raise IngestError(f"{path}: images[{i}] ({_label(entry)}) has no 'cocoid' or 'imgid' field")
    return _integer(Path(path), f"images[{i}] ({_label(entry)})", entry[key], key)


def image_file(path: Path | str, i: int, entry: dict[str, Any]) -> str:
    """``filepath/filename`` of entry ``i``, relative to the image folder; an absolute path, a ``..`` component,
    an empty name or a wrong type is an :class:`IngestError` naming the row."""
    path = Path(path)
    where = f"images[{i}] ({_label(entry)})"
    name = _string(path, where, _entry_field(path, i, entry, "filename"), "filename")
    folder = entry.get("filepath")
    folder = "" if folder is None else _string(path, where, folder, "filepath")
    rel = PurePosixPath(folder) / name
    if not name or name.endswith("/") or "\x00" in str(rel):
        raise IngestError(f"{path}: {where} has an empty or invalid 'filename' {name!r}")
    if PurePosixPath(name).is_absolute() or rel.is_absolute() or ".." in rel.parts:
        raise IngestError(f"{path}: {where} file {str(rel)!r} is an absolute path or leaves the image folder "
                          "('..'); 'filepath' / 'filename' must be relative to the image folder")
    return str(rel)


def probe_image(file: str | Path, mode: str = "decode") -> tuple[int, int, str | None]:
    """``(width, height, None)`` if ``file`` is a usable image, else ``(0, 0, reason)``.
    ``mode``: decode (full decode to RGB) | header (size only)."""
    try:
        with Image.open(file) as im:
            w, h = im.size
            if mode == "decode":
                im.convert("RGB").load()
        return w, h, None
    except FileNotFoundError:
        return 0, 0, "missing image file"
    except Exception as e:  # noqa: BLE001 (any decoder failure is reported by name)
        return 0, 0, f"cannot decode image ({type(e).__name__}: {e})"


def _probe(args: tuple[str, str]) -> tuple[int, int, str | None]:
    return probe_image(*args)


def map_images(fn: Callable[[T], R], jobs: list[T], processes: int = 1, **progress_kw: Any) -> list[R]:
    """``[fn(j) for j in jobs]`` with a "checking images" progress bar, in a pool of ``processes`` forked
    workers when there are enough jobs (``fn`` must be a module-level function)."""
    if processes > 1 and len(jobs) > 256:
        with mp.get_context("fork").Pool(processes) as pool:
            return list(progress(pool.imap(fn, jobs, chunksize=64), "checking images", len(jobs), **progress_kw))
    return [fn(j) for j in progress(jobs, "checking images", len(jobs), **progress_kw)]


def read_report(path: str | Path) -> dict[str, str]:
    """``{file: reason}`` from an image-check report (``file<TAB>reason`` lines, ``#`` comments; written by
    :func:`itmatch.data.image_check.check_images`); empty if there is none."""
    path = Path(path)
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            file, _, reason = line.partition("\t")
            out[file] = reason
    return out


def ingest(json_path: str | Path, image_root: str | Path, images_out: str | Path, captions_out: str | Path,
           options: IngestOptions | None = None, processes: int = 1,
           bad_images: str | Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Validate the dataset and write the two contract tables (atomically). Returns them.

    ``bad_images``: optional report of the download stage's image check (``file<TAB>reason`` lines,
    ``#`` comments; a missing file means none): the images it lists count as unusable even when this
    ingest's own probe (e.g. ``verify_images: header``) would pass them.
    """
    opt = options or IngestOptions()
    json_path, image_root = Path(json_path), Path(image_root)
    entries = iter_karpathy_json(json_path)
    allowed_splits = {"train", "val", "test", "restval"}
    rows: list[dict[str, Any]] = []
    seen_ids: dict[int, int] = {}
    seen_files: dict[str, int] = {}
    seen_sent: dict[int, int] = {}
    dropped = Counter()
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise IngestError(f"{json_path}: images[{i}] is not an object")
        file = image_file(json_path, i, e)
        fname = e["filename"]
        split = _string(json_path, f"images[{i}] ({fname})", _entry_field(json_path, i, e, "split"), "split")
        sentences = _entry_field(json_path, i, e, "sentences")
        if not isinstance(sentences, list):
            raise IngestError(f"{json_path}: images[{i}] ({fname}) field 'sentences' must be a list of caption "
                              f"objects, got {_kind(sentences)}")
        if split not in allowed_splits:
            raise IngestError(f"{json_path}: images[{i}] ({fname}) has unknown split {split!r}; "
                              f"allowed: {', '.join(sorted(allowed_splits))}")
        if split == "restval":
            split = "train" if opt.restval_as_train else None
            if split is None:
                dropped["restval"] += 1
                continue
        image_id = image_id_of(e, json_path, i)
        if image_id in seen_ids:
            raise IngestError(f"{json_path}: images[{i}] ({fname}) duplicates image id {image_id} "
                              f"of images[{seen_ids[image_id]}]")
        seen_ids[image_id] = i
        if file in seen_files:
            raise IngestError(f"{json_path}: images[{i}] duplicates file {file} of images[{seen_files[file]}]")
        seen_files[file] = i
        caps = []
        for j, s in enumerate(sentences):
            if not isinstance(s, dict) or "raw" not in s:
                raise IngestError(f"{json_path}: images[{i}] ({fname}) sentences[{j}] has no 'raw' text")
            where = f"images[{i}] ({fname}) sentences[{j}]"
            raw = _string(json_path, where, s["raw"], "raw")
            sid = _integer(json_path, where, s["sentid"], "sentid") if "sentid" in s else -1
            if sid in seen_sent:
                raise IngestError(f"{json_path}: images[{i}] ({fname}) sentences[{j}] duplicates sentid {sid} "
                                  f"of images[{seen_sent[sid]}]")
            seen_sent[sid] = i
            caps.append((sid, raw.strip()))
        caps = fit_caption_count(caps, opt, dropped, f"{json_path}: images[{i}] ({fname}, id {image_id})")
        if caps is None:
            continue
        rows.append({"image_id": image_id, "split": split, "file": file, "captions": caps, "index": i})

    rows = _check_images(rows, image_root, opt, processes, dropped, _read_bad_images(bad_images))
    return write_tables(rows, images_out, captions_out, str(json_path), dropped)


def fit_caption_count(caps: list[T], opt: IngestOptions, dropped: Counter, where: str) -> list[T] | None:
    """An image's captions cut to ``captions_per_image`` (``truncate_extra_captions``), ``None`` to drop the image
    (``on_bad_caption_count: drop``); another count is an :class:`IngestError` naming ``where``."""
    k = opt.captions_per_image
    if len(caps) > k and opt.truncate_extra_captions:
        dropped["extra captions truncated"] += len(caps) - k
        caps = caps[:k]
    if len(caps) != k:
        what = "no captions" if not caps else f"{len(caps)} captions, expected {k}"
        if opt.on_bad_caption_count == "drop":
            dropped[f"images dropped: caption count != {k}"] += 1
            return None
        raise IngestError(f"{where} has {what} (set ingest.captions_per_image to your count, or "
                          "ingest.on_bad_caption_count: drop to drop such images)")
    return caps


def write_tables(rows: list[dict[str, Any]], images_out: str | Path, captions_out: str | Path, source: str,
                 dropped: Counter) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Sort ``rows`` (``image_id``, ``split``, ``file``, ``width``, ``height``, ``captions`` [(id, text)],
    ``index``) by split, then ``index``; write images.parquet + captions.parquet atomically; return them."""
    order = {s: n for n, s in enumerate(SPLITS)}
    rows.sort(key=lambda r: (order[r["split"]], r["index"]))
    images = pd.DataFrame({
        "image_id": [r["image_id"] for r in rows], "split": [r["split"] for r in rows],
        "file": [r["file"] for r in rows], "width": [r["width"] for r in rows],
        "height": [r["height"] for r in rows]})
    captions = pd.DataFrame(
        [{"caption_id": sid, "image_id": r["image_id"], "split": r["split"], "text": text}
         for r in rows for sid, text in r["captions"]],
        columns=["caption_id", "image_id", "split", "text"])
    for what, n in sorted(dropped.items()):
        log.warning("ingest %s: %s: %d", source, what, n)
    counts = images["split"].value_counts().to_dict()
    log.info("ingest %s: %d images (%s), %d captions", source, len(images),
             ", ".join(f"{s} {counts.get(s, 0)}" for s in SPLITS), len(captions))
    write_parquet(images_out, pa.Table.from_pandas(images, schema=IMAGES_SCHEMA, preserve_index=False))
    write_parquet(captions_out, pa.Table.from_pandas(captions, schema=CAPTIONS_SCHEMA, preserve_index=False))
    return images, captions


def _read_bad_images(path: str | Path | None) -> dict[str, str]:
    if path is None:
        return {}
    return {f: f"listed in {Path(path).name} ({why})" for f, why in read_report(path).items()}


def _check_images(rows: list[dict[str, Any]], root: Path, opt: IngestOptions, processes: int,
                  dropped: Counter, known_bad: dict[str, str] | None = None) -> list[dict[str, Any]]:
    jobs = [(str(root / r["file"]), opt.verify_images) for r in rows]
    probes = map_images(_probe, jobs, processes)
    if known_bad:
        probes = [(w, h, err or known_bad.get(r["file"])) for r, (w, h, err) in zip(rows, probes, strict=True)]
    bad = [(r, err) for r, (_, _, err) in zip(rows, probes, strict=True) if err]
    if bad and opt.on_bad_image != "drop":
        listing = "\n  ".join(f"{root / r['file']} (image id {r['image_id']}): {err}" for r, err in bad[:50])
        more = f"\n  … and {len(bad) - 50} more" if len(bad) > 50 else ""
        raise IngestError(f"{len(bad)} unusable image(s) under {root} "
                          f"(set ingest.on_bad_image: drop to drop them):\n  {listing}{more}")
    kept = []
    for r, (w, h, err) in zip(rows, probes, strict=True):
        if err:
            dropped[f"images dropped: {err.split(' (')[0]}"] += 1
            continue
        r["width"], r["height"] = w, h
        kept.append(r)
    return kept
