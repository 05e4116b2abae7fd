"""Export ``regions.h5`` (+ ``images.parquet``, ``captions.parquet``, ``blocks.h5``) to the layouts other
codebases read — the inverse of :mod:`itmatch.features.importers`, and tested as such (every format read back
by our importer gives the same arrays).

Formats (``itmatch export FEATURES --format F --out DIR``):

- ``scan-precomp``: SCAN's precomputed layout (kuanghuei/SCAN ``data.py``, ``PrecompDataset``): per split
  ``{split}_ims.npy`` float32 [n, R, D] (every region row, padding included), ``{split}_caps.txt`` (5 captions
  per image, in image order, one per line) and ``{split}_ids.txt`` (one image id per line, the rows' order).
  Split names are SCAN's: ``train``, ``dev`` (our ``val``), ``test`` (SCAN's COCO scripts call the 5K test set
  ``testall``: rename ``test_*`` to ``testall_*`` for them); other split values keep their own name. With a
  ``blocks.h5`` beside the features, also PFAN's ``{split}_boxes.npy`` float32 [n, R, 2L]: the L block indices
  then their L weights (the layout our PFAN importer reads; HaoYang0123/Position-Focused-Attention-Network).
- ``npz``: one ``<file stem>.npz`` per image, as MILVLG/bottom-up-attention.pytorch's extractor writes it
  (``utils/extract_utils.py``, ``save_roi_features``, line 111 at 4dbce86): ``x`` float32 [n, D], ``bbox``
  float32 [n, 4], ``num_bbox``, ``image_h``, ``image_w`` and ``info`` (a dict: ``image_id``, ``image_h``,
  ``image_w``, ``num_boxes``, ``objects_id``, ``objects_conf``, ``attrs_id``, ``attrs_conf``; a pickled
  object, so readers must allow pickles for it alone). The four tag arrays are also written as
  top-level keys, which is what our importer (and any reader with ``allow_pickle=False``) reads. Tags are left
  out when no region has one. ``--npz-name image_id`` names files ``<image_id>.npz`` instead.
- ``tsv``: the original bottom-up-attention TSV (peteanderson80/bottom-up-attention ``tools/generate_tsv.py``,
  ``FIELDNAMES`` line 34 and lines 98–103): ``regions.tsv``, tab-separated, no header, fields ``image_id,
  image_w, image_h, num_boxes, boxes, features``, boxes and features base64 of float32 ``[num_boxes, 4|D]``.
  ``--tsv-tags`` appends the four tag fields ``objects_id`` (int64), ``objects_conf``, ``attrs_id``,
  ``attrs_conf`` (float32) as some forks do; off by default, since readers that unpack exactly six fields
  break on them.

npz and tsv hold only the valid regions of each image (``num_regions``) and need boxes (a ``boxes_missing``
import is refused). Class names, when the file has them, go to ``objects_vocab.txt`` / ``attributes_vocab.txt``
(Visual Genome's file names) so that a re-import keeps them. Features are stored as float16 in ``regions.h5``
and exported as float32 (exact), so a re-import gives bit-identical arrays; PFAN weights are re-normalised by
the importer, which may move them by up to 2 float32 ulp.

Everything goes into a temporary folder beside DIR, renamed to DIR only when complete (an error or a kill
leaves no DIR); images are read ``block`` at a time, never all at once.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from itmatch.features.regions_io import Regions, RegionsError, open_regions
from itmatch.utils.h5 import open_h5, reading
from itmatch.utils.io import atomic_path, remove_stale
from itmatch.utils.logs import log, progress

FORMATS = ("scan-precomp", "npz", "tsv")
SCAN_NAMES = {"train": "train", "val": "dev", "test": "test"}
TAGS = (("object_id", "objects_id", np.int64), ("object_conf", "objects_conf", np.float32),
        ("attribute_id", "attrs_id", np.int64), ("attribute_conf", "attrs_conf", np.float32))


class ExportError(RegionsError):
    """Inputs that cannot be exported in the asked format; the message names the file and field."""


@dataclass
class ExportInputs:
    """The artifacts an export reads; ``None`` where absent."""

    regions: Path
    images: Path | None
    captions: Path | None
    blocks: Path | None


def find_inputs(features: str | Path, images: str | Path | None = None, captions: str | Path | None = None,
                blocks: str | Path | None = None) -> ExportInputs:
    """The regions file (``FEATURES`` or ``FEATURES/regions.h5``) and its companions by the contract's paths
    (``results/features/{dataset}/`` → ``results/data/{dataset}/``); explicit paths must exist."""
    reg = Path(features)
    if reg.is_dir():
        reg = reg / "regions.h5"
    if not reg.exists():
        raise FileNotFoundError(f"{reg}: regions file not found")
    data = reg.parent.parent.parent / "data" / reg.parent.name

    def pick(given: str | Path | None, default: Path) -> Path | None:
        if given is not None:
            if not Path(given).exists():
                raise FileNotFoundError(f"{given}: not found")
            return Path(given)
        return default if default.exists() else None

    return ExportInputs(reg, pick(images, data / "images.parquet"), pick(captions, data / "captions.parquet"),
                        pick(blocks, reg.parent / "blocks.h5"))


def _images_table(inputs: ExportInputs, reg: Regions, need: str | None) -> pd.DataFrame | None:
    """images.parquet, checked to list regions.h5's images in its row order; ``need``: why it is required."""
    if inputs.images is None:
        if need:
            raise ExportError(f"{inputs.regions}: {need} needs images.parquet (not found at the contract's path "
                              f"results/data/<dataset>/images.parquet; give --images)")
        return None
    t = pd.read_parquet(inputs.images, columns=["image_id", "split", "file"])
    ids = reg["image_id"][:]
    if len(t) != reg.n or not np.array_equal(t["image_id"].to_numpy(np.int64), ids):
        raise ExportError(f"{inputs.images}: its {len(t)} image ids are not those of {inputs.regions} ({reg.n} "
                          f"images) in the same order; the two belong to different runs")
    return t


def take_rows(dataset, rows: np.ndarray) -> np.ndarray:
    """``dataset[rows]`` for increasing ``rows``: one contiguous read when they are dense, else h5py's
    point selection (a split's rows may be scattered over the whole file)."""
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    if hi - lo <= 2 * len(rows):
        return dataset[lo:hi][rows - lo]
    return dataset[rows]


def iter_regions(reg: Regions, block: int, rows: np.ndarray | None = None
                 ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """``(first row, arrays)`` of ``block`` images at a time (features as float32), over ``rows`` (increasing
    row numbers; default all)."""
    rows = np.arange(reg.n) if rows is None else np.asarray(rows)
    names = ("image_id", "features", "boxes", "image_hw", "num_regions", *(t[0] for t in TAGS))
    for a in range(0, len(rows), block):
        sel = rows[a:a + block]
        with reading(reg.path, f"rows {int(sel[0])}-{int(sel[-1])}"):
            out = {k: take_rows(reg[k], sel) for k in names}
        out["features"] = out["features"].astype(np.float32)
        yield a, out


def _write_vocab(reg: Regions, tmp: Path) -> None:
    for names, file in ((reg.meta.object_names, "objects_vocab.txt"),
                        (reg.meta.attribute_names, "attributes_vocab.txt")):
        if names:
            (tmp / file).write_text("".join(f"{n}\n" for n in names), encoding="utf-8")


def _has_tags(reg: Regions, block: int) -> bool:
    """Whether any region carries an object or attribute id."""
    for a in range(0, reg.n, block):
        if (reg["object_id"][a:a + block] >= 0).any() or (reg["attribute_id"][a:a + block] >= 0).any():
            return True
    return False


# ---------------------------------------------------------------- SCAN / PFAN


def _split_name(split: str) -> str:
    name = SCAN_NAMES.get(str(split), str(split))
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ExportError(f"split {split!r} cannot be a file-name prefix")
    return name


def _captions_by_split(path: Path, t: pd.DataFrame, split: str) -> list[str]:
    """The split's captions, 5 per image in image order (checked), whitespace folded to single spaces."""
    caps = pd.read_parquet(path, columns=["image_id", "split", "text"])
    caps = caps[caps["split"] == split]
    want = t.loc[t["split"] == split, "image_id"].to_numpy(np.int64)
    got = caps["image_id"].to_numpy(np.int64)
    if len(got) != 5 * len(want) or not np.array_equal(got, np.repeat(want, 5)):
        counts = caps.groupby("image_id").size().reindex(want, fill_value=0)
        off = counts[counts != 5]
        detail = (f"image {off.index[0]} has {off.iloc[0]}" if len(off)
                  else "the captions are not in the images' order (5i..5i+4 = image i)")
        raise ExportError(f"{path}: SCAN's layout needs exactly 5 captions per image in image order; in split "
                          f"{split!r} {detail}")
    return [" ".join(str(s).split()) for s in caps["text"]]


def export_scan(reg: Regions, inputs: ExportInputs, tmp: Path, block: int) -> dict[str, Any]:
    """SCAN ``{split}_ims.npy`` / ``_caps.txt`` / ``_ids.txt`` (+ PFAN ``{split}_boxes.npy``) into ``tmp``."""
    t = _images_table(inputs, reg, "the scan-precomp format (image splits)")
    assert t is not None
    blocks = None
    if inputs.blocks is not None:
        blocks = open_h5(inputs.blocks)
        if not np.array_equal(blocks["image_id"][:], reg["image_id"][:]):
            blocks.close()
            raise ExportError(f"{inputs.blocks}: image ids differ from {inputs.regions}; rebuild blocks.h5")
    else:
        log.info("%s: no blocks.h5 beside it: PFAN's *_boxes.npy are not written", inputs.regions)
    if inputs.captions is None:
        log.warning("no captions.parquet for %s: *_caps.txt are not written", inputs.regions)
    summary: dict[str, Any] = {}
    split_of = t["split"].astype(str).to_numpy()
    try:
        for split in pd.unique(split_of):
            name = _split_name(split)
            rows = np.flatnonzero(split_of == split)
            ids = t["image_id"].to_numpy(np.int64)[rows]
            caps = _captions_by_split(inputs.captions, t, split) if inputs.captions is not None else None
            ims = np.lib.format.open_memmap(tmp / f"{name}_ims.npy", mode="w+", dtype=np.float32,
                                            shape=(len(rows), reg.r, reg.d))
            boxes = None
            if blocks is not None:
                L = blocks["index"].shape[2]
                boxes = np.lib.format.open_memmap(tmp / f"{name}_boxes.npy", mode="w+", dtype=np.float32,
                                                  shape=(len(rows), blocks["index"].shape[1], 2 * L))
            for a, arr in progress(iter_regions(reg, block, rows), desc=f"export {name}",
                                   total=-(-len(rows) // block), unit="block"):
                b = a + len(arr["image_id"])
                ims[a:b] = arr["features"]
                if boxes is not None:
                    with reading(inputs.blocks, f"rows {int(rows[a])}-{int(rows[b - 1])}"):
                        idx = take_rows(blocks["index"], rows[a:b])
                        w = take_rows(blocks["weight"], rows[a:b])
                    boxes[a:b] = np.concatenate([idx.astype(np.float32), w.astype(np.float32)], axis=-1)
            ims.flush()
            del ims
            if boxes is not None:
                boxes.flush()
                del boxes
            (tmp / f"{name}_ids.txt").write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
            if caps is not None:
                (tmp / f"{name}_caps.txt").write_text("".join(f"{c}\n" for c in caps), encoding="utf-8")
            summary[name] = len(rows)
    finally:
        if blocks is not None:
            blocks.close()
    return {"splits": summary, "pfan_boxes": blocks is not None, "captions": inputs.captions is not None}


# ---------------------------------------------------------------- npz / tsv


def _valid(arr: dict[str, np.ndarray], j: int) -> tuple[int, dict[str, np.ndarray]]:
    n = int(arr["num_regions"][j])
    return n, {k: v[j, :n] for k, v in arr.items() if k in ("features", "boxes", *(t[0] for t in TAGS))}


def export_npz(reg: Regions, inputs: ExportInputs, tmp: Path, block: int, name_by: str = "stem"
               ) -> dict[str, Any]:
    """One MILVLG-style ``.npz`` per image into ``tmp``."""
    reg.require_boxes("the npz export")
    if name_by not in ("stem", "image_id"):
        raise ExportError(f"--npz-name must be stem or image_id, not {name_by!r}")
    t = _images_table(inputs, reg, "--npz-name stem (image file names)" if name_by == "stem" else None)
    if name_by == "stem":
        assert t is not None
        names = [Path(f).stem for f in t["file"]]
        dup = pd.Series(names)[pd.Series(names).duplicated()]
        if len(dup):
            raise ExportError(f"{inputs.images}: image file stem {dup.iloc[0]!r} occurs twice; use --npz-name "
                              f"image_id")
    else:
        names = [str(i) for i in reg["image_id"][:]]
    tags = _has_tags(reg, block)
    for a, arr in progress(iter_regions(reg, block), desc="export npz", total=-(-reg.n // block), unit="block"):
        for j in range(len(arr["image_id"])):
            n, v = _valid(arr, j)
            h, w = (int(x) for x in arr["image_hw"][j])
            stem = names[a + j]
            keys: dict[str, Any] = {"x": v["features"], "bbox": v["boxes"].astype(np.float32), "num_bbox": n,
                                    "image_h": h, "image_w": w}
            info: dict[str, Any] = {"image_id": stem, "image_h": h, "image_w": w, "num_boxes": n}
            if tags:
                for ours, theirs, dtype in TAGS:
                    keys[theirs] = info[theirs] = v[ours].astype(dtype)
            # info: a 0-d object array, as np.savez stores MILVLG's dict
            np.savez_compressed(tmp / f"{stem}.npz", **keys, info=np.asarray(info, dtype=object))
    return {"files": reg.n, "tags": tags}


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")


def export_tsv(reg: Regions, inputs: ExportInputs, tmp: Path, block: int, tags: bool = False) -> dict[str, Any]:
    """The bottom-up-attention TSV ``regions.tsv`` into ``tmp``."""
    reg.require_boxes("the tsv export")
    with open(tmp / "regions.tsv", "w", encoding="ascii", newline="") as fh:
        for _a, arr in progress(iter_regions(reg, block), desc="export tsv", total=-(-reg.n // block),
                                unit="block"):
            for j in range(len(arr["image_id"])):
                n, v = _valid(arr, j)
                if n == 0:
                    raise ExportError(f"{inputs.regions}: image {arr['image_id'][j]} has no regions; a TSV row "
                                      f"needs num_boxes ≥ 1")
                h, w = (int(x) for x in arr["image_hw"][j])
                fields = [str(int(arr["image_id"][j])), str(w), str(h), str(n), _b64(v["boxes"].astype(np.float32)),
                          _b64(v["features"])]
                if tags:
                    fields += [_b64(v[ours].astype(dtype)) for ours, _, dtype in TAGS]
                fh.write("\t".join(fields) + "\n")
    return {"rows": reg.n, "tags": tags}


# ---------------------------------------------------------------- entry point


def export_features(features: str | Path, fmt: str, out: str | Path, *, images: str | Path | None = None,
                    captions: str | Path | None = None, blocks: str | Path | None = None, tsv_tags: bool = False,
                    npz_name: str = "stem", block: int = 256, overwrite: bool = False) -> dict[str, Any]:
    """Write ``features`` (regions.h5 or its folder) in format ``fmt`` into the folder ``out``, atomically.

    Returns a summary (format, source, output folder and per-format counts).
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if block < 1:
        raise ExportError(f"block must be ≥ 1, got {block}")
    inputs = find_inputs(features, images, captions, blocks)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out}: folder exists and is not empty; choose another --out or pass --overwrite "
                          f"(replaces it)")
    remove_stale(out)
    with open_regions(inputs.regions) as reg, atomic_path(out) as tmp:
        tmp.mkdir()
        if fmt == "scan-precomp":
            info = export_scan(reg, inputs, tmp, block)
        elif fmt == "npz":
            info = export_npz(reg, inputs, tmp, block, npz_name)
        else:
            info = export_tsv(reg, inputs, tmp, block, tsv_tags)
        _write_vocab(reg, tmp)
        n, r, d = reg.n, reg.r, reg.d
    log.info("exported %d images (%d regions × %d) from %s as %s → %s", n, r, d, inputs.regions, fmt, out)
    return {"format": fmt, "source": str(inputs.regions), "out": str(out), "images": n, **info}

