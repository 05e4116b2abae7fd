"""BSSAN's VGG-19 conv5_4 grid features (itmatch.features.grid): equal to torchvision's network on known images
with a seeded checkpoint, weights errors before any work, shard resume, and the workflow scheduling the stage only
when BSSAN's W2R reads the grid."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from itmatch.features import grid as gr
from itmatch.features.extract import partial_path
from itmatch.utils.tensors import save_tensors
from tests.conftest import REPO, TEST_CONFIG

KNOWN = ["a_landscape.png", "c_portrait.png", "d_verywide.png"]   # 640×480, 480×640, 1600×300
FIXTURES = REPO / "tests" / "fixtures" / "reference" / "images"


@pytest.fixture(scope="module")
def seeded_vgg(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """torchvision's VGG-19 features with the init of torch.manual_seed(0), saved in torchvision's state-dict
    layout (``features.<i>.weight`` / ``.bias``; the classifier is left out: 80 MB instead of 548 MB)."""
    torch.manual_seed(0)
    sd = {f"features.{k}": v for k, v in torchvision.models.vgg19(weights=None).features.state_dict().items()}
    path = tmp_path_factory.mktemp("vgg") / "vgg19-seeded.pth"
    save_tensors(path, sd)
    return path, sd


@pytest.fixture(scope="module")
def known_images(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("known")
    rows = []
    for i, name in enumerate(KNOWN):
        shutil.copy(FIXTURES / name, root / name)
        w, h = Image.open(root / name).size
        rows.append({"image_id": 70 + i, "split": "test", "file": name, "width": w, "height": h})
    pd.DataFrame(rows).to_parquet(root / "images.parquet")
    return root / "images.parquet", root


def _opts(weights, **kw) -> gr.GridOptions:
    return gr.GridOptions.from_config({"weights": str(weights), "workers": 0, "threads": 1, "device": "cpu", **kw})


def _reference(sd: dict[str, torch.Tensor], files: list[Path], size: int, relu: bool) -> np.ndarray:
    """torchvision's vgg19().features up to conv5_4 (after relu5_4 when ``relu``) on images decoded by PIL and
    resized to size × size by torchvision, as [B, (size/16)², 512] float16, row-major cells."""
    torch.manual_seed(1)
    net = torchvision.models.vgg19(weights=None)
    net.load_state_dict(sd, strict=False)                                 # the classifier keeps its init
    t = torchvision.models.VGG19_Weights.IMAGENET1K_V1.transforms()
    xs = []
    for f in files:
        img = TF.pil_to_tensor(Image.open(f).convert("RGB"))
        img = TF.resize(img, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)
        xs.append(TF.normalize(img.float() / 255, mean=t.mean, std=t.std))
    with torch.no_grad():
        y = net.eval().features[: 36 if relu else 35](torch.stack(xs))   # [B, 512, S/16, S/16]
    return y.permute(0, 2, 3, 1).reshape(len(files), -1, 512).numpy().astype(np.float16)


def test_grid_of_known_images_equals_torchvision_vgg19_conv5_4(seeded_vgg, known_images, tmp_path):
    """The 224 × 224 grid of three known images through the seeded VGG-19 equals torchvision's
    ``vgg19().features`` output up to conv5_4 (after its ReLU), bit for bit as stored (float16), in the image
    order of images.parquet; shards gathered into grid.h5 [N, 196, 512]."""
    weights, sd = seeded_vgg
    pq, root = known_images
    opts = _opts(weights, batch_size=3)
    shard = gr.extract_grid_shard(pq, root, tmp_path / "1-of-1.h5", 0, 1, opts)
    gr.gather_grid([shard], pq, tmp_path / "grid.h5")
    ref = _reference(sd, [root / n for n in KNOWN], 224, relu=True)
    with h5py.File(tmp_path / "grid.h5", "r") as f:
        assert f["features"].shape == (3, 196, 512) and f["features"].dtype == np.float16
        assert f["features"].chunks == (1, 196, 512)
        assert f["image_id"][:].tolist() == [70, 71, 72]
        a = dict(f.attrs)
        feats = f["features"][:]
    assert (a["network"], a["layer"], a["image_size"], a["resize"], a["grid"], a["feature_dim"]) == \
        ("vgg19", "relu5_4", 224, "stretch", 14, 512)
    from itmatch.utils.hashing import sha256_file
    assert a["weights_sha256"] == sha256_file(weights)
    assert (feats >= 0).all() and (feats > 0).mean() > 0.05                 # after the ReLU, not all zero
    np.testing.assert_array_equal(feats, ref)
    assert not np.array_equal(feats[0], feats[1])


def test_relu_false_is_conv5_4_before_its_relu(seeded_vgg, known_images, tmp_path):
    """``relu: false``: the raw convolution (features[:35]); a smaller input gives a smaller grid (64 px → 4×4)."""
    weights, sd = seeded_vgg
    pq, root = known_images
    out = gr.extract_grid_shard(pq, root, tmp_path / "s.h5", 0, 1, _opts(weights, batch_size=3, relu=False,
                                                                        image_size=64))
    with h5py.File(out, "r") as f:
        feats = f["features"][:]
        assert f.attrs["layer"] == "conv5_4" and f.attrs["grid"] == 4
    assert feats.shape == (3, 16, 512) and (feats < 0).any()
    np.testing.assert_array_equal(feats, _reference(sd, [root / n for n in KNOWN], 64, relu=False))


def test_center_crop_is_the_weights_evaluation_transform(known_images):
    pq, root = known_images
    img = np.array(Image.open(root / KNOWN[0]).convert("RGB"))
    got = gr.preprocess(img, 224, "center_crop")
    ref = torchvision.models.VGG19_Weights.IMAGENET1K_V1.transforms()(torch.from_numpy(img).permute(2, 0, 1))
    assert torch.equal(got, ref)
    assert gr.preprocess(img, 224, "stretch").shape == (3, 224, 224)


def test_weights_errors_name_the_file_key_and_shape(seeded_vgg, known_images, tmp_path):
    """A set-but-missing file, a missing key and a tensor of the wrong shape stop with a message naming
    grid.weights, the file, the key and the expected shape, before any image is read or shard written."""
    pq, root = known_images
    with pytest.raises(FileNotFoundError, match=r"grid\.weights: VGG-19 weights file .*nope\.pth does not exist"):
        gr.load_vgg19_features(tmp_path / "nope.pth")
    with pytest.raises(ValueError, match=r"grid\.weights is not set"):
        gr.load_vgg19_features(None)
    _, sd = seeded_vgg
    wrong = dict(sd)
    wrong["features.34.weight"] = torch.zeros(256, 512, 3, 3)
    save_tensors(tmp_path / "wrong.pth", wrong)
    with pytest.raises(ValueError, match=r"wrong\.pth: tensor 'features\.34\.weight' has shape \[256, 512, 3, 3\], "
                                         r"expected \[512, 512, 3, 3\]"):
        gr.load_vgg19_features(tmp_path / "wrong.pth")
    save_tensors(tmp_path / "short.pth", {k: v for k, v in sd.items() if not k.startswith("features.32.")})
    with pytest.raises(ValueError, match=r"short\.pth has no tensor 'features\.32\.weight' \(expected shape "
                                         r"\[512, 512, 3, 3\]"):
        gr.load_vgg19_features(tmp_path / "short.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"grid\.weights: .*junk\.pth is not a readable PyTorch state dict"):
        gr.load_vgg19_features(tmp_path / "junk.pth")
    out = tmp_path / "shard.h5"
    with pytest.raises(ValueError, match=r"features\.34\.weight"):
        gr.extract_grid_shard(tmp_path / "no-such-images.parquet", root, out, 0, 1, _opts(tmp_path / "wrong.pth"))
    assert not out.exists() and not partial_path(out).exists()


class _Stop(Exception):
    pass


def test_killed_shard_resumes_to_the_same_file(seeded_vgg, known_images, tmp_path):
    """A shard interrupted after its first batch keeps that batch (``done``) and continues from it; the result
    equals an uninterrupted run. A partial file of other settings is started over."""
    weights, _ = seeded_vgg
    pq, root = known_images
    opts = _opts(weights, batch_size=2, image_size=32)
    ref = gr.extract_grid_shard(pq, root, tmp_path / "ref.h5", 0, 1, opts)
    out = tmp_path / "run.h5"
    with pytest.raises(_Stop):
        gr.extract_grid_shard(pq, root, out, 0, 1, opts, on_batch=lambda d: (_ for _ in ()).throw(_Stop()))
    assert not out.exists()
    with h5py.File(partial_path(out), "r") as f:
        assert f["done"][0] == 2
    seen: list[int] = []
    gr.extract_grid_shard(pq, root, out, 0, 1, opts, on_batch=seen.append)
    assert seen == [3]                                          # resumed at row 2: one batch left
    with h5py.File(ref, "r") as a, h5py.File(out, "r") as b:
        np.testing.assert_array_equal(a["features"][:], b["features"][:])
        assert set(a.attrs) == set(b.attrs) and all(np.all(a.attrs[k] == b.attrs[k]) for k in a.attrs)
    other = tmp_path / "other.h5"
    with pytest.raises(_Stop):
        gr.extract_grid_shard(pq, root, other, 0, 1, opts, on_batch=lambda d: (_ for _ in ()).throw(_Stop()))
    seen = []
    gr.extract_grid_shard(pq, root, other, 0, 1, _opts(weights, batch_size=2, image_size=48), on_batch=seen.append)
    assert seen == [2, 3]                                       # another image size: started over


def test_gather_checks_shards(seeded_vgg, known_images, tmp_path):
    """Two shards gathered equal one shard (batch size 1: the same batches; with other batch compositions the
    CPU convolutions may round differently, by up to a float16 ulp), and mismatched shards are refused."""
    weights, _ = seeded_vgg
    pq, root = known_images
    opts = _opts(weights, batch_size=1, image_size=32)
    s1 = gr.extract_grid_shard(pq, root, tmp_path / "1-of-2.h5", 0, 2, opts)
    s2 = gr.extract_grid_shard(pq, root, tmp_path / "2-of-2.h5", 1, 2, opts)
    gr.gather_grid([s2, s1], pq, tmp_path / "grid.h5", block=1)
    one = gr.extract_grid_shard(pq, root, tmp_path / "1-of-1.h5", 0, 1, opts)
    with h5py.File(tmp_path / "grid.h5", "r") as g, h5py.File(one, "r") as o:
        np.testing.assert_array_equal(g["features"][:], o["features"][:])
        assert g["image_id"][:].tolist() == [70, 71, 72]
    with pytest.raises(gr.GridError, match="cover 1 rows"):
        gr.gather_grid([s1], pq, tmp_path / "g2.h5")
    with h5py.File(s2, "r+") as f:
        f.attrs["resize"] = "center_crop"
    with pytest.raises(gr.GridError, match="network, layer, weights or preprocessing differ"):
        gr.gather_grid([s1, s2], pq, tmp_path / "g3.h5")
    assert not (tmp_path / "g3.h5").exists()


# ---- workflow: the grid stage is scheduled exactly when BSSAN's W2R reads the grid ---------------------------
def _tiny_f30k(root: Path) -> None:
    """A two-image Flickr30K in Karpathy's format (dataset_flickr30k.json + images), placeholder weights."""
    images = root / "resources" / "f30k" / "images"
    images.mkdir(parents=True)
    entries = []
    for i, split in enumerate(["train", "test"]):
        Image.new("RGB", (40, 30), (40 * i, 90, 200)).save(images / f"{1000 + i}.jpg")
        entries.append({"filename": f"{1000 + i}.jpg", "imgid": i, "split": split,
                        "sentids": list(range(5 * i, 5 * i + 5)),
                        "sentences": [{"raw": f"a photo number {k}", "tokens": ["a", "photo", "number", str(k)],
                                       "imgid": i, "sentid": 5 * i + k} for k in range(5)]})
    (root / "resources" / "f30k" / "dataset_flickr30k.json").write_text(
        json.dumps({"images": entries, "dataset": "flickr30k"}))
    (root / "resources" / "vgg19.pth").write_bytes(b"placeholder")
    (root / "resources" / "detector.pth").write_bytes(b"placeholder")


def _dry_run(workdir: Path, *configs: Path, target: str = "results/bssan/f30k/metrics.json"
             ) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--configfile",
           str(REPO / "config" / "config.yaml"), str(TEST_CONFIG), *map(str, configs), "-n", "--cores", "1", target]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=workdir)


def _jobs(stdout: str) -> dict[str, int]:
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", stdout, re.M)}


def test_workflow_schedules_the_grid_stage_only_for_grid_w2r(tmp_path):
    _tiny_f30k(tmp_path)
    base = tmp_path / "f30k.yaml"
    base.write_text("datasets: {f30k: {source: local}}\ndetector: {checkpoints: {f30k: resources/detector.pth}}\n"
                    "grid: {weights: resources/vgg19.pth}\n")
    proc = _dry_run(tmp_path, base)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = _jobs(proc.stdout)
    assert jobs.get("extract_grid_shard") == 2 and jobs.get("gather_grid") == 1, proc.stdout[-3000:]
    assert "results/features/f30k/grid.h5" in proc.stdout
    assert "results/features/f30k/grid_shards/2-of-2.h5" in proc.stdout
    regions = tmp_path / "regions.yaml"
    regions.write_text("models: {bssan: {datasets: {f30k: {w2r_input: regions}}}}\ngrid: {weights: null}\n")
    proc = _dry_run(tmp_path, base, regions)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = _jobs(proc.stdout)
    assert "extract_grid_shard" not in jobs and "gather_grid" not in jobs and jobs.get("train_model") == 1
    unset = tmp_path / "unset.yaml"
    unset.write_text("grid: {weights: null}\n")
    proc = _dry_run(tmp_path, base, unset)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "grid.weights is not set" in out and "models.bssan.datasets.f30k.w2r_input: regions" in out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available() is False)")
def test_grid_on_cuda_equals_cpu(seeded_vgg, known_images, tmp_path):
    """``grid.device: cuda`` (fp32, TF32 off) gives the CPU's grid within float rounding (``pytest -m gpu``)."""
    weights, _ = seeded_vgg
    pq, root = known_images
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        gpu = gr.extract_grid_shard(pq, root, tmp_path / "gpu.h5", 0, 1, _opts(weights, batch_size=3, device="cuda"))
    finally:
        torch.backends.cudnn.allow_tf32 = old
    cpu = gr.extract_grid_shard(pq, root, tmp_path / "cpu.h5", 0, 1, _opts(weights, batch_size=3))
    with h5py.File(gpu, "r") as a, h5py.File(cpu, "r") as b:
        x, y = a["features"][:].astype(np.float32), b["features"][:].astype(np.float32)
    assert x.shape == (3, 196, 512)
    np.testing.assert_allclose(x, y, rtol=1e-2, atol=1e-3 * float(np.abs(y).max()))
