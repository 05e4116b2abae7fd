"""SCAN's precomputed data as a dataset (kind ``precomp``): the field's ``data/{f30k,coco}_precomp/`` folders.

A folder holds, per split prefix P (SCAN: ``train``, ``dev``, ``test``, ``testall``):

- ``P_caps.txt``: captions, one per line, 5 per image in image order (image i ↔ lines 5i..5i+4); read as SCAN's
  ``data.py`` does (line 33–35: bytes, ``line.strip()``), decoded as UTF-8;
- ``P_ims.npy``: float region features [images, regions, dim] (36 × 2048 bottom-up features), or one row per
  caption (SCAN's "rkiros" redundancy: F30K's ``dev_ims.npy`` has 5070 rows for 1014 images; ``data.py``
  line 40–44 then divides the row by 5);
- ``P_ids.txt`` (optional): one image id per line, per image or per caption; without it image ids are row
  numbers, counted on across the splits;
- ``P_boxes.npy`` (optional, PFAN): [images, regions, 2L], per region L block indices then their L weights.

Our splits map to prefixes by ``splits`` (default train → ``train``, val → ``dev``, test → ``testall`` when the
folder has it, else ``test``). :func:`resolve_precomp` checks the folder (every named file, ranks, dtypes,
line counts) from the ``.npy`` headers without reading the arrays; :func:`ingest_precomp` writes images.parquet
(width and height 0 = unknown) and captions.parquet; regions.h5 and blocks.h5 come from the importers of
:mod:`itmatch.features.importers` (memory-mapped, streamed) through :func:`precomp_import_spec`. This module
imports no feature or text code, so that editing those does not rerun the ingest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from itmatch.data.ingest import CAPTIONS_SCHEMA, IMAGES_SCHEMA, SPLITS, IngestError
from itmatch.utils.io import write_parquet
from itmatch.utils.logs import log

CAPTIONS_PER_IMAGE = 5  # SCAN data.py line 40–44 (im_div = 5)
FLOAT_KINDS = "f"


class PrecompError(IngestError):
    """A precomp folder that cannot be used; the message names the file, the count or the setting."""


@dataclass(frozen=True)
class PrecompSplit:
    """One of our splits in a precomp folder: its files and sizes (from the headers)."""

    split: str            # ours: train | val | test
    prefix: str           # SCAN's: train | dev | test | testall | ...
    caps: Path
    ims: Path
    ids: Path | None
    boxes: Path | None
    n_images: int
    n_captions: int
    rows_per_image: int   # 1, or 5 when ims.npy has one row per caption

    def spec(self) -> dict[str, Any]:
        """The split's paths as strings (for Snakemake params / the importers)."""
        return {"prefix": self.prefix, "caps": str(self.caps), "ims": str(self.ims),
                "ids": None if self.ids is None else str(self.ids),
                "boxes": None if self.boxes is None else str(self.boxes)}


def default_splits(folder: str | Path) -> dict[str, str]:
    """train → train, val → dev, test → testall when ``testall_caps.txt`` exists, else test."""
    folder = Path(folder)
    return {"train": "train", "val": "dev", "test": "testall" if (folder / "testall_caps.txt").exists() else "test"}


def npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a ``.npy`` without reading its data (a clear error for other files)."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise PrecompError(f"{path}: not a readable .npy array ({e})") from e
    return tuple(arr.shape), arr.dtype


def read_caption_lines(path: str | Path) -> list[str]:
    """Captions of a ``P_caps.txt``: one per line, stripped (SCAN data.py line 35), UTF-8; a final newline ends
    the last caption, it does not start an empty one."""
    raw = Path(path).read_bytes()
    lines = raw.split(b"\n")
    if lines and lines[-1].strip() == b"":
        lines.pop()
    out = []
    for n, line in enumerate(lines, 1):
        try:
            out.append(line.strip().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise PrecompError(f"{path}:{n}: not UTF-8 ({e})") from e
    return out


def _count_lines(path: Path) -> int:
    return len(read_caption_lines(path))


def _resolve_boxes(folder: Path, prefix: str, boxes: str | bool, key: str, check: bool = True) -> Path | None:
    path = folder / f"{prefix}_boxes.npy"
    if boxes is False or boxes == "false":
        return None
    if path.exists() or (boxes in (True, "true") and not check):
        return path
    if boxes is True or boxes == "true":
        raise PrecompError(f"{path} not found ({key}.boxes: true needs PFAN's position file of every split)")
    return None


def precomp_paths(folder: str | Path, splits: dict[str, str] | None = None, boxes: str | bool = "auto",
                  key: str = "datasets.<name>", check: bool = True) -> dict[str, dict[str, Any]]:
    """The files of our three splits (``{split: {prefix, caps, ims, ids, boxes}}``, paths as strings or None).
    ``check``: each must exist (an error naming the setting). While the workflow's DAG is built (``check``
    false) only the files of an explicit ``splits`` entry must, the others are left to Snakemake's missing-input
    report. ``boxes`` auto: PFAN's position files when every split has one; true: expected for every split."""
    folder = Path(folder)
    if check and not folder.is_dir():
        raise PrecompError(f"{key}.folder: {folder} is not a folder")
    given = dict(splits or {})
    unknown = sorted(set(given) - set(SPLITS))
    if unknown:
        raise PrecompError(f"{key}.splits: unknown split(s) {', '.join(unknown)}; ours are {', '.join(SPLITS)}")
    prefixes = {**default_splits(folder), **given}
    out: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        prefix = prefixes[split]
        where = f"{key}.splits.{split}" if split in given else f"{key} (split {split} = SCAN's {prefix!r})"
        caps, ims, ids = (folder / f"{prefix}_{x}" for x in ("caps.txt", "ims.npy", "ids.txt"))
        for f in (caps, ims):
            if (check or split in given) and not f.exists():
                raise PrecompError(f"{where}: {f} does not exist")
        out[split] = {"prefix": prefix, "caps": str(caps), "ims": str(ims), "ids": str(ids) if ids.exists() else None,
                      "boxes": _resolve_boxes(folder, prefix, boxes, key, check)}
    have = [s for s, p in out.items() if p["boxes"] is not None]
    if boxes not in (True, "true") and 0 < len(have) < len(out):
        log.warning("%s: PFAN position files for %s only: not used (every split needs one)", folder, ", ".join(have))
        for p in out.values():
            p["boxes"] = None
    for p in out.values():
        p["boxes"] = None if p["boxes"] is None else str(p["boxes"])
    return out


def resolve_precomp(folder: str | Path, splits: dict[str, str] | None = None, boxes: str | bool = "auto",
                    key: str = "datasets.<name>") -> dict[str, PrecompSplit]:
    """Our three splits of a precomp folder, checked: each named file exists; ``P_ims.npy`` is float of rank 3;
    the caption count is 5 × its images; an ids file has one id per image or per caption; ``P_boxes.npy`` (when
    used) is float [images, regions, 2L] with the features' images and regions. ``boxes``: true (required),
    false (ignored) or auto (used when every split has one). ``key`` names the setting in errors."""
    out: dict[str, PrecompSplit] = {}
    for split, p in precomp_paths(folder, splits, boxes, key).items():
        prefix, caps, ims = p["prefix"], Path(p["caps"]), Path(p["ims"])
        shape, dtype = npy_header(ims)
        if len(shape) != 3 or dtype.kind not in FLOAT_KINDS:
            raise PrecompError(f"{ims}: shape {shape} dtype {dtype}; expected float [images, regions, dim]")
        n_caps = _count_lines(caps)
        if n_caps == shape[0] and n_caps % CAPTIONS_PER_IMAGE == 0:
            n_img, per = n_caps // CAPTIONS_PER_IMAGE, CAPTIONS_PER_IMAGE  # one row per caption
        elif n_caps == CAPTIONS_PER_IMAGE * shape[0]:
            n_img, per = shape[0], 1
        else:
            raise PrecompError(f"{caps}: {n_caps} captions, not {CAPTIONS_PER_IMAGE} × the {shape[0]} images of "
                               f"{ims.name} (nor one per row)")
        ids = None if p["ids"] is None else Path(p["ids"])
        if ids is not None:
            n_ids = _count_lines(ids)
            if n_ids not in (n_img, CAPTIONS_PER_IMAGE * n_img):
                raise PrecompError(f"{ids}: {n_ids} ids for {n_img} images (expected one per image or per caption)")
        box = None if p["boxes"] is None else Path(p["boxes"])
        if box is not None:
            bshape, bdtype = npy_header(box)
            if len(bshape) != 3 or bshape[2] % 2 or bdtype.kind not in "fiu":
                raise PrecompError(f"{box}: shape {bshape} dtype {bdtype}; expected PFAN's [images, regions, 2L]")
            if bshape[0] not in (n_img, shape[0]) or bshape[1] != shape[1]:
                raise PrecompError(f"{box}: shape {bshape} does not match {ims.name} ({n_img} images, "
                                   f"{shape[1]} regions)")
        out[split] = PrecompSplit(split, prefix, caps, ims, ids, box, n_img, n_caps, per)
    dims = {s.split: npy_header(s.ims)[0][1:] for s in out.values()}
    if len(set(dims.values())) != 1:
        raise PrecompError(f"{folder}: the splits' [regions, dim] differ: {dims}")
    return out


def precomp_import_spec(paths: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The ``extraction.import`` spec that the workflow's import rules run for a precomp dataset: SCAN's
    ``*_ims.npy`` → regions.h5, PFAN's ``*_boxes.npy`` (when used) → blocks.h5; rows follow images.parquet's
    split order (its ingest wrote them in file order), so no ids are needed."""
    spec: dict[str, Any] = {"format": "scan_npy",
                            "splits": {s: {"features": p["ims"], "ids": None} for s, p in paths.items()}}
    if all(p["boxes"] for p in paths.values()):
        spec["pfan_boxes"] = {s: {"boxes": p["boxes"], "ids": None} for s, p in paths.items()}
    return spec


def read_id_lines(path: str | Path) -> np.ndarray:
    """Image ids of a ``P_ids.txt``: one a line (an integer, or a file name ending in one, as
    :func:`itmatch.features.importers.read_ids`), blank lines skipped."""
    out = []
    for n, line in enumerate(read_caption_lines(path), 1):
        if not line:
            continue
        m = re.search(r"(\d+)(?:\.\w+)?$", line)
        if not m:
            raise PrecompError(f"{path}:{n}: no image id in {line!r}")
        out.append(int(m.group(1)))
    return np.asarray(out, np.int64)


def _ids(s: PrecompSplit) -> np.ndarray | None:
    if s.ids is None:
        return None
    ids = read_id_lines(s.ids)
    if len(ids) == CAPTIONS_PER_IMAGE * s.n_images:
        per = ids.reshape(-1, CAPTIONS_PER_IMAGE)
        if not (per == per[:, :1]).all():
            row = int(np.argwhere(per != per[:, :1])[0][0])
            raise PrecompError(f"{s.ids}: lines {CAPTIONS_PER_IMAGE * row + 1}..{CAPTIONS_PER_IMAGE * row + 5} "
                               f"(image {row}) name different images")
        ids = per[:, 0]
    return ids


def ingest_precomp(splits: dict[str, PrecompSplit], images_out: str | Path, captions_out: str | Path
                   ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """images.parquet + captions.parquet of a resolved precomp folder (written atomically)."""
    images, captions = [], []
    next_id, caption_id = 0, 0
    seen: dict[int, str] = {}
    for split in SPLITS:
        s = splits[split]
        caps = read_caption_lines(s.caps)
        ids = _ids(s)
        if ids is None:
            ids = np.arange(next_id, next_id + s.n_images, dtype=np.int64)
        next_id = max(next_id, int(ids.max()) + 1) if len(ids) else next_id
        for i, image_id in enumerate(ids.tolist()):
            if image_id in seen:
                raise PrecompError(f"{s.ids}: image id {image_id} (image {i}) is also in split {seen[image_id]}")
            seen[image_id] = split
        images.append(pd.DataFrame({"image_id": ids, "split": split,
                                    "file": [f"{s.prefix}_ims.npy:{i}" for i in range(s.n_images)],
                                    "width": np.zeros(s.n_images, np.int32),
                                    "height": np.zeros(s.n_images, np.int32)}))
        captions.append(pd.DataFrame({"caption_id": np.arange(caption_id, caption_id + len(caps), dtype=np.int64),
                                      "image_id": np.repeat(ids, CAPTIONS_PER_IMAGE), "split": split,
                                      "text": caps}))
        caption_id += len(caps)
    img, cap = pd.concat(images, ignore_index=True), pd.concat(captions, ignore_index=True)
    write_parquet(images_out, pa.Table.from_pandas(img, schema=IMAGES_SCHEMA, preserve_index=False))
    write_parquet(captions_out, pa.Table.from_pandas(cap, schema=CAPTIONS_SCHEMA, preserve_index=False))
    log.info("precomp: %s", ", ".join(f"{s.split} = {s.prefix}: {s.n_images} images, {s.n_captions} captions"
                                      for s in splits.values()))
    return img, cap


def ingest_precomp_folder(folder: str | Path, splits: dict[str, str] | None, boxes: str | bool,
                          images_out: str | Path, captions_out: str | Path, key: str = "datasets.<name>"
                          ) -> dict[str, PrecompSplit]:
    """Rule ingest of a precomp dataset: check the whole folder first, then write the two tables."""
    resolved = resolve_precomp(folder, splits, boxes, key)
    ingest_precomp(resolved, images_out, captions_out)
    return resolved


#: optional model inputs (:meth:`itmatch.models.base.MatchingModel.inputs`) a precomp folder never has
PRECOMP_LACKS = {
    "tags": "the detector's object and attribute tags (GLFN's tags.h5: SCAN's .npy features carry none; GLFN "
            "runs without them with use_tags: false)",
    "objects": "the detector's object confidences (BSSAN's O2W branch picks its regions by them; branches: w2r "
               "runs without)",
    "grid": "the images for BSSAN's VGG-19 grid (grid.h5; a precomp folder has features, no images: "
            "w2r_input: regions attends over the folder's regions instead)",
}


def precomp_missing(needs: frozenset[str] | set[str], paths: dict[str, dict[str, Any]], key: str) -> list[str]:
    """What of a model's optional inputs ``needs`` a precomp folder (:func:`precomp_paths`) cannot give."""
    out = [PRECOMP_LACKS[n] for n in sorted(needs) if n in PRECOMP_LACKS]
    if "blocks" in needs and not all(p["boxes"] for p in paths.values()):
        out.append(f"PFAN's position files ({', '.join(p['prefix'] + '_boxes.npy' for p in paths.values())} in "
                   f"the folder; {key}.boxes) for blocks.h5")
    return out
