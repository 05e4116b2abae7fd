"""Check every image a Karpathy-format JSON references: it exists and decodes to RGB.

Grayscale (L), CMYK, palette (P) and alpha (LA / RGBA) images are fine: the check decodes with
``.convert("RGB")``, exactly as ingest and region extraction read them. Images that are missing or
cannot be decoded are written to a report (one ``file<TAB>reason`` per line, ``file`` relative to the
image folder as in ``images.parquet``); :func:`check_images` raises :class:`BadImagesError` listing them
unless ``on_bad="drop"`` (then ingest drops them and their captions, see ``ingest(bad_images=...)``).
"""

from __future__ import annotations

from pathlib import Path

from itmatch.data.ingest import IngestError, image_file, iter_karpathy_json, map_images, probe_image
from itmatch.data.ingest import read_report as read_report  # the report format is shared with ingest
from itmatch.utils.io import atomic_path
from itmatch.utils.logs import log

REPORT_HEADER = "# images referenced by the dataset JSON that are missing or cannot be decoded: file<TAB>reason\n"


class BadImagesError(ValueError):
    """Some referenced images are missing or undecodable; the message lists them by name."""


def image_files(json_path: str | Path) -> list[str]:
    """``filepath/filename`` of every entry of a Karpathy JSON (relative to the image folder; one that is
    absolute or leaves the folder is an :class:`~itmatch.data.ingest.IngestError` naming the row)."""
    out = []
    for i, e in enumerate(iter_karpathy_json(json_path)):
        if not isinstance(e, dict):
            raise IngestError(f"{json_path}: images[{i}] is not an object")
        out.append(image_file(json_path, i, e))
    return out


def probe(path: str, mode: str = "decode") -> str | None:
    """None if ``path`` is a usable image, else the reason. ``mode``: decode | header | exists."""
    if not Path(path).is_file():
        return "missing image file"
    if mode == "exists":
        return None
    return probe_image(path, mode)[2]


def _probe(args: tuple[str, str]) -> str | None:
    return probe(*args)


def check_images(json_path: str | Path, image_root: str | Path, report: str | Path, mode: str = "decode",
                 on_bad: str = "error", processes: int = 1) -> dict[str, str]:
    """Probe every referenced image, write ``report`` (always, empty when all are fine) and return
    ``{file: reason}`` for the bad ones. Raises :class:`BadImagesError` naming them unless
    ``on_bad == "drop"``."""
    root = Path(image_root)
    files = image_files(json_path)
    jobs = [(str(root / f), mode) for f in files]
    reasons = map_images(_probe, jobs, processes, unit="img")
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
