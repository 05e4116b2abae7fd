"""BSSAN's W2R input: the VGG-19 ``conv5_4`` grid of every image → ``grid.h5``, sharded and resumable.

BSSAN §IV-B (``../shared/papers/bssan.txt``): "we resize the images to 224 × 224 with channel RGB and employ the
VGG-19 network [49] pre-trained on ImageNet dataset [50]. Similar to [3], the output of layer 'conv5_4' is used
as the region maps with the dimension of 196 × 512."

- **Network**: ``torchvision.models.vgg19().features`` up to conv5_4, with the ImageNet weights of the file
  ``grid.weights`` in torchvision's state-dict layout (``vgg19-dcbb9e9d.pth``, the file of
  ``torchvision.models.VGG19_Weights.IMAGENET1K_V1``; classifier keys, when present, are ignored). The file is
  checked before any image is read (:func:`load_vgg19_features`): missing → ``FileNotFoundError`` naming
  ``grid.weights`` and the path; a missing key or a tensor of another shape → ``ValueError`` naming the file, the
  key and the expected shape. Built on the meta device and filled with the file's tensors (no random init of
  the 20 M parameters first).
- **Layer**: conv5_4 **after its ReLU** (``features[:36]``, i.e. relu5_4; ``relu: false`` gives the raw
  convolution, ``features[:35]``). The paper takes the layer "similar to [3]" (Show, Attend and Tell), whose
  features came from the Caffe release of VGG-19: its deploy definitions run every ReLU in place on its
  convolution's blob (``bottom: "conv5_4" top: "conv5_4"``), so the blob named conv5_4 holds rectified values.
  The attention (eq. 1–3) then weights non-negative region maps, as in [3].
- **Input**: each image decoded by OpenCV as in region extraction (:func:`itmatch.features.extract.load_image`,
  RGB uint8), then ``resize: stretch`` (default): the whole image resized to ``image_size`` × ``image_size``
  (224 × 224) with torchvision's bilinear, antialiased ``transforms.functional.resize``, aspect ratio not kept:
  the paper "resize[s] the images to 224 × 224", and §IV-D up-samples the 14 × 14 attention by 16 onto the
  image for Fig. 7, i.e. the grid covers the whole image (no crop). ``resize: center_crop`` is the weights' own
  ImageNet evaluation transform instead (shorter side to 256, centre 224 × 224 crop). Then scaled to [0, 1] and
  normalised with the ImageNet mean / std of ``VGG19_Weights.IMAGENET1K_V1.transforms()``.
- **Output** ``grid.h5`` (image order of ``images.parquet``): ``image_id`` int64 [N]; ``features`` float16
  [N, G, C], G = (image_size / 16)² = 196 cells in row-major order (cell = y · 14 + x), C = 512; one image per
  chunk, fletcher32; attributes :class:`GridMeta`. Shards (``grid_shards/{i}-of-{n}.h5``) have the same layout
  plus ``row_start``, ``row_stop`` and ``done``, and use the resumable shard machinery of region extraction
  (:func:`itmatch.features.extract.open_shard`, :func:`~itmatch.features.extract.gather_rows`).

Inference runs under ``torch.inference_mode`` in float32 (on a GPU cuDNN may use TF32 for the convolutions,
PyTorch's default), batches of ``batch_size`` images, DataLoader workers decoding and resizing.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from itmatch.config import schema_defaults
from itmatch.features.extract import (
    ShardLayout,
    finish_shard,
    gather_rows,
    load_image,
    mark_done,
    open_shard,
    shard_rows,
)
from itmatch.utils import device as utils_device
from itmatch.utils.h5 import check_finite, checksum
from itmatch.utils.hashing import sha256_file
from itmatch.utils.logs import log, progress
from itmatch.utils.tensors import load_tensors

WEIGHTS = torchvision.models.VGG19_Weights.IMAGENET1K_V1   # the ImageNet weights' metadata (mean, std, sizes)
STRIDE = 16            # conv5_4 is after 4 max-pools: a 224 × 224 input gives a 14 × 14 grid (BSSAN §IV-D)
LAYERS = {True: ("relu5_4", 36), False: ("conv5_4", 35)}   # relu → (name, modules of vgg19().features kept)
RESIZES = ("stretch", "center_crop")


class GridError(ValueError):
    """A grid file or shard does not match the layout (the message names the file and dataset)."""


@dataclass(frozen=True)
class GridOptions:
    """The ``grid`` config section (no defaults here: :meth:`from_config` fills them from the schema)."""

    weights: str | None       # torchvision VGG-19 state dict (ImageNet)
    image_size: int           # S: the network input is S × S (224)
    resize: str               # stretch | center_crop
    relu: bool                # conv5_4 after its ReLU (relu5_4) or before
    batch_size: int
    workers: int
    device: str               # auto | cpu | cuda
    threads: int              # torch intra-op threads (0 = torch's default)
    gather_block: int

    @classmethod
    def from_config(cls, grid: dict[str, Any]) -> GridOptions:
        g = {**schema_defaults("grid"), **grid}
        return cls(weights=g["weights"], image_size=int(g["image_size"]), resize=str(g["resize"]),
                   relu=bool(g["relu"]), batch_size=int(g["batch_size"]), workers=int(g["workers"]),
                   device=str(g["device"]), threads=int(g["threads"]), gather_block=int(g["gather_block"]))


@dataclass(frozen=True)
class GridMeta:
    """File attributes of ``grid.h5`` (and its shards)."""

    network: str              # "vgg19" (torchvision layout)
    layer: str                # relu5_4 (conv5_4 after its ReLU) | conv5_4
    weights_sha256: str
    image_size: int
    resize: str
    grid: int                 # cells per side (image_size / 16)
    feature_dim: int          # 512

    @property
    def cells(self) -> int:
        return self.grid * self.grid

    def write(self, f: h5py.File) -> None:
        f.attrs.update(asdict(self))

    @classmethod
    def read(cls, f: h5py.File) -> GridMeta:
        missing = [k for k in cls.__dataclass_fields__ if k not in f.attrs]
        if missing:
            raise GridError(f"{f.filename}: missing file attribute(s) {', '.join(missing)}")
        a = f.attrs
        return cls(network=str(a["network"]), layer=str(a["layer"]), weights_sha256=str(a["weights_sha256"]),
                   image_size=int(a["image_size"]), resize=str(a["resize"]), grid=int(a["grid"]),
                   feature_dim=int(a["feature_dim"]))


def create_grid(path: str | Path, image_ids: np.ndarray, meta: GridMeta, early_alloc: bool = False) -> h5py.File:
    """An empty ``grid.h5`` for ``image_ids`` (features zero), opened for writing; the caller closes it.
    ``early_alloc``: every chunk allocated now (a shard killed between flushes stays consistent)."""
    n = len(image_ids)
    f = h5py.File(path, "w")
    meta.write(f)
    f.create_dataset("image_id", data=np.asarray(image_ids, np.int64), track_times=False,
                     **checksum((n,)))
    dcpl = None
    if early_alloc:
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    shape = (n, meta.cells, meta.feature_dim)
    f.create_dataset("features", shape=shape, dtype=np.float16, chunks=(1, *shape[1:]) if n else None,
                     dcpl=dcpl, track_times=False, **checksum(shape))
    return f


def check_grid(f: h5py.File) -> tuple[int, GridMeta]:
    """Check a grid file's datasets, dtypes and shapes against its attributes; return (N, meta)."""
    meta = GridMeta.read(f)
    for name, dtype in (("image_id", np.int64), ("features", np.float16)):
        if name not in f:
            raise GridError(f"{f.filename}: missing dataset '{name}'")
        if f[name].dtype != dtype:
            raise GridError(f"{f.filename}: dataset '{name}' has dtype {f[name].dtype}, expected {np.dtype(dtype)}")
    n = f["image_id"].shape[0]
    want = (n, meta.cells, meta.feature_dim)
    if f["features"].shape != want:
        raise GridError(f"{f.filename}: dataset 'features' has shape {f['features'].shape}, expected {want}")
    return n, meta


GRID_LAYOUT = ShardLayout(
    what="grid", check=check_grid, mismatch="network, layer, weights or preprocessing",
    describe=lambda m: f"{m.network} {m.layer} {m.weights_sha256[:12]}, {m.image_size} px {m.resize}",
    create=lambda path, ids, meta: create_grid(path, ids, meta), datasets=("features",), error=GridError)


# ---- the network ------------------------------------------------------------------------------------------
def vgg19_features(relu: bool = True) -> nn.Sequential:
    """``torchvision.models.vgg19().features`` up to conv5_4 (after its ReLU when ``relu``), on the meta device:
    shapes only, no memory, no random init (:func:`load_vgg19_features` fills it)."""
    with torch.device("meta"):
        return torchvision.models.vgg19(weights=None).features[: LAYERS[relu][1]]


def load_vgg19_features(path: str | Path | None, relu: bool = True, device: str | torch.device = "cpu"
                        ) -> nn.Sequential:
    """The VGG-19 layers up to conv5_4 with the weights of ``path`` (torchvision's state-dict layout, keys
    ``features.<i>.weight`` / ``.bias``; a ``{"state_dict": ...}`` wrapper is accepted), in eval mode on ``device``.
    Errors name ``grid.weights``, the file, the key and the expected shape; they come before any other work."""
    if not path:
        raise ValueError("grid.weights is not set: BSSAN's grid features need torchvision's ImageNet VGG-19 weights "
                         f"({WEIGHTS.url}); set grid.weights to that file")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"grid.weights: VGG-19 weights file {path} does not exist (torchvision's ImageNet "
                                f"state dict, {WEIGHTS.url.rsplit('/', 1)[-1]} from {WEIGHTS.url})")
    try:
        sd = load_tensors(path)
    except Exception as e:  # noqa: BLE001 (any unreadable file: say which)
        raise ValueError(f"grid.weights: {path} is not a readable PyTorch state dict ({type(e).__name__}: {e})"
                         ) from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"grid.weights: {path} holds a {type(sd).__name__}, not a state dict (name → tensor)")
    net = vgg19_features(relu)
    state = {}
    for key, ref in net.state_dict().items():
        full = f"features.{key}"
        want = tuple(ref.shape)
        if full not in sd:
            raise ValueError(f"grid.weights: {path} has no tensor {full!r} (expected shape {list(want)}; "
                             f"torchvision's vgg19 state-dict layout)")
        t = sd[full]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != want or not t.is_floating_point():
            got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"grid.weights: {path}: tensor {full!r} has shape {got}, expected {list(want)} "
                             f"(floating point; torchvision's vgg19)")
        state[key] = t.float()
    net.load_state_dict(state, strict=True, assign=True)
    return net.to(device).eval()


# ---- input ------------------------------------------------------------------------------------------------
def preprocess(image: np.ndarray, size: int, resize: str) -> torch.Tensor:
    """uint8 HWC RGB → float32 [3, size, size], ImageNet-normalised (see the module docstring)."""
    if resize not in RESIZES:
        raise ValueError(f"grid.resize must be one of {', '.join(RESIZES)}, got {resize!r}")
    t = WEIGHTS.transforms()
    img = torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1)   # uint8 [3, H, W]
    if resize == "stretch":
        img = TF.resize(img, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)
    else:  # the weights' evaluation transform, scaled to `size` (224 → shorter side 256, crop 224)
        img = TF.resize(img, [round(size * t.resize_size[0] / t.crop_size[0])], interpolation=t.interpolation,
                        antialias=True)
        img = TF.center_crop(img, [size, size])
    x = TF.convert_image_dtype(img, torch.float32)
    return TF.normalize(x, mean=t.mean, std=t.std)


class GridImages(Dataset):
    """Shard rows → (row, preprocessed [3, S, S]) in DataLoader workers."""

    def __init__(self, files: list[str], rows: list[int], size: int, resize: str):
        self.files, self.rows, self.size, self.resize = files, rows, size, resize

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        return self.rows[i], preprocess(load_image(self.files[i]), self.size, self.resize)


def _collate(items: list[tuple[int, torch.Tensor]]) -> tuple[list[int], torch.Tensor]:
    rows, xs = zip(*items, strict=True)
    return list(rows), torch.stack(xs)


def grid_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """[B, 3, S, S] → [B, G, 512]: the conv5_4 map [B, 512, S/16, S/16], cells in row-major order."""
    return net(x).flatten(2).transpose(1, 2)


def _fingerprint(meta: GridMeta, opts: GridOptions, image_ids: np.ndarray) -> str:
    """What a partial shard must match to be resumed: weights, preprocessing, layer, batch size, rows."""
    h = hashlib.sha256(json.dumps([asdict(meta), opts.batch_size], sort_keys=True).encode())
    h.update(np.ascontiguousarray(image_ids, dtype=np.int64).tobytes())
    return h.hexdigest()


def grid_meta(opts: GridOptions, weights_sha256: str) -> GridMeta:
    if opts.image_size % STRIDE:
        raise ValueError(f"grid.image_size must be a multiple of {STRIDE}, got {opts.image_size}")
    return GridMeta(network="vgg19", layer=LAYERS[opts.relu][0], weights_sha256=weights_sha256,
                    image_size=opts.image_size, resize=opts.resize, grid=opts.image_size // STRIDE, feature_dim=512)


def extract_grid_shard(images_parquet: str | Path, image_dir: str | Path, out: str | Path, shard: int,
                       n_shards: int, opts: GridOptions, on_batch: Callable[[int], None] | None = None) -> Path:
    """Grid features of shard ``shard`` of ``n_shards`` of ``images.parquet`` into ``out`` (resuming a partial
    run). The weights are loaded and checked first. ``on_batch(done)`` runs after each flushed batch (tests)."""
    if opts.resize not in RESIZES:
        raise ValueError(f"grid.resize must be one of {', '.join(RESIZES)}, got {opts.resize!r}")
    net = load_vgg19_features(opts.weights, opts.relu)          # bad weights stop here, before any work
    meta = grid_meta(opts, sha256_file(opts.weights))
    out = Path(out)
    table = pd.read_parquet(images_parquet, columns=["image_id", "file"])
    start, stop = shard_rows(len(table), shard, n_shards)
    part = table.iloc[start:stop]
    ids = part["image_id"].to_numpy(np.int64)
    n = len(part)
    device = utils_device.resolve_device(opts.device, "grid.device")
    if opts.threads > 0:
        torch.set_num_threads(opts.threads)
    net = net.to(device)
    f, tmp = open_shard(out, _fingerprint(meta, opts, ids), n,
                        {"row_start": start, "row_stop": stop, "shard": shard, "n_shards": n_shards},
                        lambda p: create_grid(p, ids, meta, early_alloc=True), check=check_grid)
    done = int(f["done"][0])
    log.info("grid shard %d/%d: rows %d..%d of %s (%d images, %d already done), device %s, %s %s, %d px %s",
             shard + 1, n_shards, start, stop, images_parquet, n, done, device, meta.network, meta.layer,
             meta.image_size, meta.resize)
    try:
        if done < n:
            files = [str(Path(image_dir) / name) for name in part["file"].tolist()[done:]]
            loader = DataLoader(GridImages(files, list(range(done, n)), opts.image_size, opts.resize),
                                batch_size=opts.batch_size, shuffle=False, num_workers=opts.workers,
                                collate_fn=_collate, pin_memory=device.type == "cuda")
            t0 = time.perf_counter()
            with torch.inference_mode():
                for rows, x in progress(loader, desc=f"grid {out.name}", total=len(loader), unit="batch"):
                    if rows[0] != done:
                        raise RuntimeError(f"batch starts at shard row {rows[0]}, expected {done}")
                    feats = grid_features(net, x.to(device, non_blocking=True)).float().cpu().numpy()
                    with np.errstate(over="ignore"):    # overflow to inf is caught by check_finite, row named
                        values = feats.astype(np.float16)
                    check_finite(values, f.filename, "features", done, ids[done:done + len(rows)])
                    f["features"][done:done + len(rows)] = values
                    done += len(rows)
                    mark_done(f, done)
                    if on_batch is not None:
                        on_batch(done)
            secs = time.perf_counter() - t0
            log.info("grid shard %d/%d: %d images in %.1f s (%.2f images/s)", shard + 1, n_shards, len(files), secs,
                     len(files) / max(secs, 1e-9))
    finally:
        f.close()
    return finish_shard(tmp, out)


def gather_grid(shards: list[str | Path], images_parquet: str | Path, out_h5: str | Path, block: int = 64) -> None:
    """Concatenate complete grid shards into ``grid.h5`` (checked: same weights and preprocessing, contiguous
    rows, the image ids of ``images.parquet``), ``block`` images at a time."""
    gather_rows(shards, images_parquet, out_h5, GRID_LAYOUT, block)
    log.info("gathered %d grid shards → %s", len(shards), out_h5)
