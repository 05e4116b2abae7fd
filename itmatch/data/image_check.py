"""Check every image a Karpathy-format JSON references: it exists and decodes to RGB.

Grayscale (L), CMYK, palette (P) and alpha (LA / RGBA) images are fine: the check decodes with
``.convert("RGB")``, exactly as ingest and region extraction read them. Images that are missing or
cannot be decoded are written to a report (one ``file<TAB>reason`` per line, ``file`` relative to the
image folder as in ``images.parquet``); :func:`check_images` raises :class:`BadImagesError` listing them
unless ``on_bad="drop"`` (then ingest drops them and their captions, see ``ingest(bad_images=...)``).
"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

from PIL import Image

from itmatch.data.ingest import read_karpathy_json
from itmatch.utils.io import atomic_path
from itmatch.utils.logs import log, progress

REPORT_HEADER = "# images referenced by the dataset JSON that are missing or cannot be decoded: file<TAB>reason\n"


class BadImagesError(ValueError):
    """Some referenced images are missing or undecodable; the message lists them by name."""


def image_files(json_path: str | Path) -> list[str]:
    """``filepath/filename`` of every entry of a Karpathy JSON (relative to the image folder)."""
    out = []
    for i, e in enumerate(read_karpathy_json(json_path)):
        if not isinstance(e, dict) or "filename" not in e:
            raise BadImagesError(f"{json_path}: images[{i}] has no 'filename' field")
        out.append(str(Path(e.get("filepath", "")) / e["filename"]))
    return out


def probe(path: str, mode: str = "decode") -> str | None:
    """None if ``path`` is a usable image, else the reason. ``mode``: decode | header | exists."""
    p = Path(path)
    if not p.is_file():
        return "missing image file"
    if mode == "exists":
        return None
    try:
        with Image.open(p) as im:
            im.size  # noqa: B018 (header parsed)
            if mode == "decode":
                im.convert("RGB").load()
        return None
    except Exception as e:  # noqa: BLE001 (any decoder failure is reported by name)
        return f"cannot decode image ({type(e).__name__}: {e})"


def _probe(args: tuple[str, str]) -> str | None:
    return probe(*args)


def read_report(path: str | Path) -> dict[str, str]:
    """``{file: reason}`` from a report written by :func:`check_images` (empty if there is none)."""
    path = Path(path)
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            file, _, reason = line.partition("\t")
            out[file] = reason
    return out


def check_images(json_path: str | Path, image_root: str | Path, report: str | Path, mode: str = "decode",
                 on_bad: str = "error", processes: int = 1) -> dict[str, str]:
    """Probe every referenced image, write ``report`` (always, empty when all are fine) and return
    ``{file: reason}`` for the bad ones. Raises :class:`BadImagesError` naming them unless
    ``on_bad == "drop"``."""
    root = Path(image_root)
    files = image_files(json_path)
    jobs = [(str(root / f), mode) for f in files]
    if processes > 1 and len(jobs) > 256:
        with mp.get_context("fork").Pool(processes) as pool:
            reasons = list(progress(pool.imap(_probe, jobs, chunksize=64), "checking images", len(jobs),
                                    unit="img"))
    else:
        reasons = [_probe(j) for j in progress(jobs, "checking images", len(jobs), unit="img")]
    bad = {f: r for f, r in zip(files, reasons, strict=True) if r}
    with atomic_path(report) as tmp:
        tmp.write_text(REPORT_HEADER + "".join(f"{f}\t{r}\n" for f, r in bad.items()), encoding="utf-8")
    log.info("%s: %d images checked (%s), %d bad, listed in %s", root, len(files), mode, len(bad), report)
    if bad and on_bad != "drop":
        listing = "\n  ".join(f"{f}: {r}" for f, r in list(bad.items())[:50])
        more = f"\n  … and {len(bad) - 50} more" if len(bad) > 50 else ""
        raise BadImagesError(f"{len(bad)} of {len(files)} images under {root} are missing or cannot be decoded "
                             f"(full list in {report}; set ingest.on_bad_image: drop to drop them and their "
                             f"captions):\n  {listing}{more}")
    if bad:
        log.warning("%s: %d bad images will be dropped by ingest (on_bad_image: drop)", root, len(bad))
    return bad
