"""Our region extraction against the reference bottom-up-attention extractor, stage by stage.

The reference (MILVLG/bottom-up-attention.pytorch 4dbce86 on detectron2 be792b9, ``bua-caffe`` R-101 config,
``extract_features.py`` in ``roi_feats`` mode) was run once on ``tests/fixtures/reference/images`` with the seeded
checkpoint of :mod:`itmatch.features.detector.seeded`; its intermediate and final outputs are the ``.npz``
fixtures next to the images (``tests/fixtures/reference/README.md`` names every key and where it was taken).
This test regenerates the same checkpoint, runs our extractor on the same images and compares:

- tensors: relative error ``max|ours − reference| / max|reference|`` over each stored tensor (or its stored
  sample) of an image must be ≤ 1e-4; the largest value over the images is printed per stage;
- region selection (both the fixed 36 and the adaptive 10–100 mode): the same proposal rows in the same order,
  except where the reference's own ``max_conf`` of the competing candidates differs by less than 1e-6 (such
  cases are printed, and then the regions both chose are compared);
- integer outputs (shapes, proposal count, object and attribute tags): equal.

Runs on the CPU in fp32; the reference ran on the CPU too.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from itmatch.config import load_config
from itmatch.features.detector import detector_config, load_detector, preprocess
from itmatch.features.detector.inference import batch_images, regions
from itmatch.features.detector.seeded import write_seeded_checkpoint
from itmatch.features.extract import load_image
from tests.conftest import REPO

FIXTURES = REPO / "tests" / "fixtures" / "reference"
RTOL = 1e-4  # issue 15: relative 1e-4 on tensors
TIE = 1e-6  # issue 15: selection may differ only where the reference's max_conf gap is below this
MODES = {"fix36": {"num_regions": "fixed", "regions": 36},  # --min-max-boxes 36,36
         "adaptive": {"num_regions": "adaptive", "min_regions": 10, "max_regions": 100}}  # bua/caffe/config.py
ERRORS: dict[str, float] = {}  # stage → largest relative error over the images (printed at the end)
NOTES: list[str] = []  # near ties excused in region selection


def fixture_images() -> list[Path]:
    return sorted(p for p in (FIXTURES / "images").glob("*.png") if (FIXTURES / f"{p.stem}.npz").is_file())


def rel_err(ours: np.ndarray | torch.Tensor, ref: np.ndarray, what: str) -> float:
    """``max|ours − ref| / max|ref|`` (float64), recorded under ``what``; shapes must agree."""
    a = ours.detach().cpu().double().numpy() if isinstance(ours, torch.Tensor) else np.asarray(ours, np.float64)
    b = np.asarray(ref, np.float64)
    assert a.shape == b.shape, f"{what}: shape {a.shape}, reference {b.shape}"
    if b.size == 0:
        return 0.0
    err = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
    ERRORS[what.split(" ")[0]] = max(ERRORS.get(what.split(" ")[0], 0.0), err)
    assert err <= RTOL, f"{what}: relative error {err:.3g} > {RTOL}"
    return err


def sample(t: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
    return t.reshape(-1)[torch.as_tensor(idx, dtype=torch.long)]


def selection_gap(ours: list[int], ref: list[int], ref_conf: np.ndarray, thresh: float) -> float:
    """Smallest reference ``max_conf`` gap that explains the difference between two row lists: every row chosen
    by one side only must be within the gap of a row chosen by the other side only (or of the threshold), and
    rows both chose but in another order must be within the gap of each other."""
    only_ours, only_ref = sorted(set(ours) - set(ref)), sorted(set(ref) - set(ours))
    gap = 0.0
    for a in only_ours + only_ref:
        rivals = only_ref if a in only_ours else only_ours
        cands = [abs(ref_conf[a] - ref_conf[b]) for b in rivals] + [abs(ref_conf[a] - thresh)]
        gap = max(gap, min(cands))
    common_ours = [r for r in ours if r in ref]
    common_ref = [r for r in ref if r in ours]
    for x, y in zip(common_ours, common_ref, strict=True):
        if x != y:
            gap = max(gap, abs(ref_conf[x] - ref_conf[y]))
    return float(gap)


def match_proposals(ours: torch.Tensor, ref: np.ndarray, ref_scores: np.ndarray, name: str) -> torch.Tensor:
    """``perm`` with ``ours[perm[j]]`` ≈ ``ref[j]`` (relative ``RTOL``): row j itself when it matches, else the one
    other row that does, allowed only when the reference's scores of the two rows differ by less than ``TIE``
    (a near tie in the RPN's sort, recorded in NOTES); any other difference fails, naming the rows."""
    a, b = ours.detach().double().numpy(), np.asarray(ref, np.float64)
    dist = np.abs(a[:, None, :] - b[None, :, :]).max(axis=2) / max(np.abs(b).max(), 1e-30)  # [ours, ref]
    perm = np.arange(len(b))
    for j in np.nonzero(dist[np.arange(len(b)), np.arange(len(b))] > RTOL)[0]:
        cand = np.nonzero(dist[:, j] <= RTOL)[0]
        assert len(cand) == 1, f"{name}: reference proposal {j} {b[j]} has {len(cand)} matches among ours"
        i = int(cand[0])
        gap = abs(float(ref_scores[j]) - float(ref_scores[i]))
        assert gap < TIE, (f"{name}: our proposal row {i} is the reference's row {j}, but their reference scores "
                           f"differ by {gap:.3g} (not a near tie)")
        NOTES.append(f"{name}: RPN near tie, reference proposal rows {j} and {i} (scores {ref_scores[j]:.9g}, "
                     f"{ref_scores[i]:.9g}, gap {gap:.2g}) come out in the other order here")
        perm[j] = i
    assert len(set(perm.tolist())) == len(perm), f"{name}: proposals matched twice"
    return torch.as_tensor(perm, dtype=torch.long)


@pytest.fixture(scope="module")
def extractor(tmp_path_factory):
    ckpt = write_seeded_checkpoint(tmp_path_factory.mktemp("seeded") / "bua-caffe-seeded.pth", seed=0)
    cfg = detector_config(load_config(REPO / "config" / "config.yaml")["detector"], "coco")
    cfg["inference"].update({"precision": "fp32", "box_source": "proposals"})
    model, _ = load_detector(str(ckpt), cfg, device="cpu")
    return model, cfg


@pytest.fixture(scope="module", autouse=True)
def report(request):
    """Print the measured errors and any excused near ties after the module, also under output capture."""
    yield
    lines = []
    if ERRORS:
        lines.append("max relative error per stage (max|ours - reference| / max|reference|, worst image):")
        lines += [f"  {k:<18} {v:.3e}" for k, v in ERRORS.items()]
    lines += [f"near tie: {n}" for n in NOTES]
    capman = request.config.pluginmanager.getplugin("capturemanager")
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    with capman.global_and_fixture_disabled():
        for line in lines:
            reporter.write_line(line)


def test_fixtures_are_present():
    assert len(fixture_images()) >= 8, f"{FIXTURES}: expected ≥ 8 images with their .npz (see README there)"


@pytest.mark.parametrize("image", fixture_images(), ids=lambda p: p.stem)
def test_stages_match_the_reference(image, extractor):
    model, cfg = extractor
    ref = dict(np.load(FIXTURES / f"{image.stem}.npz"))
    im = load_image(image)
    assert list(im.shape[:2]) == ref["image_hw"].tolist()

    # preprocessed blob and scale (utils/extract_utils.py get_image_blob)
    blob, scale = preprocess(im, cfg)
    assert scale == float(ref["scale"])
    hwc = blob.permute(1, 2, 0)
    assert list(hwc.shape) == ref["blob_shape"].tolist()
    rel_err(sample(hwc, ref["blob_idx"]), ref["blob_val"], f"blob {image.name}")
    rel_err(np.array([hwc.double().sum()]), np.array([ref["blob_sum"]]), f"blob_sum {image.name}")

    with torch.inference_mode():
        batch, hw = batch_images([blob], "cpu")
        out = model(batch, hw, [scale], cfg["inference"]["pre_nms"], cfg["inference"]["post_nms"], stages=True)[0]

    # res4 (backbone output)
    assert list(out["res4"].shape) == ref["res4_shape"].tolist()
    rel_err(sample(out["res4"], ref["res4_idx"]), ref["res4_val"], f"res4 {image.name}")
    rel_err(out["res4"].double().mean(dim=(1, 2)), ref["res4_chan_mean"], f"res4_chan_mean {image.name}")

    # RPN head outputs (raw objectness logits, box deltas)
    for key in ("rpn_logits", "rpn_deltas"):
        if f"{key}_idx" in ref:
            assert list(out[key].shape) == ref[f"{key}_shape"].tolist()
            rel_err(sample(out[key], ref[f"{key}_idx"]), ref[f"{key}_val"], f"{key} {image.name}")

    # RPN proposals after NMS, in the reference's order, and their scores. Two proposals whose reference scores
    # differ by less than TIE may come out in the other order here: ``perm[j]`` is our row of reference row j.
    assert len(out["proposals"]) == len(ref["proposals"]), f"{image.name}: proposal count"
    perm = match_proposals(out["proposals"], ref["proposals"], ref["proposal_scores"], image.name)
    rel_err(out["proposals"][perm], ref["proposals"], f"proposals {image.name}")
    rel_err(out["proposal_scores"][perm], ref["proposal_scores"], f"proposal_scores {image.name}")
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(len(perm))  # our row → reference row

    # ROI-pooled res4, res5 mean-pooled features, class and attribute probabilities (at the stored rows)
    assert list(out["pooled"].shape) == ref["pooled_shape"].tolist()
    per_row = int(np.prod(ref["pooled_shape"][1:]))
    pidx = torch.as_tensor(ref["pooled_idx"], dtype=torch.long)
    rel_err(out["pooled"].reshape(-1)[perm[pidx // per_row] * per_row + pidx % per_row], ref["pooled_val"],
            f"pooled {image.name}")
    rows = perm[torch.as_tensor(ref["rows"], dtype=torch.long)]
    rel_err(out["features"][rows], ref["feats"], f"features {image.name}")
    rel_err(out["cls_prob"][rows], ref["cls_prob"], f"cls_prob {image.name}")
    rel_err(out["attr_prob"][rows], ref["attr_prob"], f"attr_prob {image.name}")

    for mode, settings in MODES.items():
        inf = copy.deepcopy(cfg["inference"])
        inf.update(settings)
        got, sel = regions(model, out, scale, hw[0], tuple(im.shape[:2]), inf)
        if mode == "fix36":  # the selection score of every proposal (mode-independent)
            rel_err(sel["max_conf"][perm], ref["max_conf"], f"max_conf {image.name}")
        ours_rows, ref_rows = inv[sel["rows"]].tolist(), ref[f"{mode}_rows"].tolist()  # in reference rows
        if ours_rows != ref_rows:
            moved = {int(j) for j in torch.nonzero(perm != torch.arange(len(perm))).flatten()}
            rpn_tie = sorted(ours_rows) == sorted(ref_rows) and all(
                a in moved and b in moved for a, b in zip(ours_rows, ref_rows, strict=True) if a != b)
            gap = selection_gap(ours_rows, ref_rows, ref["max_conf"].astype(np.float64), inf["conf_thresh"])
            assert rpn_tie or gap < TIE, (
                f"{image.name} {mode}: chosen rows differ from the reference's beyond near ties (reference max_conf "
                f"gap {gap:.3g}); ours {ours_rows}, reference {ref_rows} (reference row numbers)")
            NOTES.append(f"{image.name} {mode}: same regions, output order follows the swapped near-tied proposals"
                         if rpn_tie else
                         f"{image.name} {mode}: rows differ only between candidates whose reference max_conf "
                         f"differ by {gap:.2g} (< {TIE}); ours {ours_rows}, reference {ref_rows}")
        if f"{mode}_selection_margin" in ref and float(ref[f"{mode}_selection_margin"]) < TIE:
            NOTES.append(f"{image.name} {mode}: the reference's own selection margin is "
                         f"{float(ref[f'{mode}_selection_margin']):.2g} (< {TIE})")
        pairs = [(i, ref_rows.index(r)) for i, r in enumerate(ours_rows) if r in ref_rows]
        mine, theirs = [p[0] for p in pairs], [p[1] for p in pairs]
        rel_err(got["boxes"][mine], ref[f"{mode}_boxes"][theirs], f"boxes {image.name} {mode}")
        # the written features are the stored ``feats`` at the chosen rows (the fixtures keep them once)
        written = ref.get(f"{mode}_feats", ref["feats"][np.searchsorted(ref["rows"], ref_rows)])
        rel_err(got["features"][mine], written[theirs], f"region_features {image.name} {mode}")
        rel_err(got["object_conf"][mine], ref[f"{mode}_object_conf"][theirs], f"object_conf {image.name} {mode}")
        rel_err(got["attribute_conf"][mine], ref[f"{mode}_attr_conf"][theirs], f"attr_conf {image.name} {mode}")
        assert got["object_id"][mine].tolist() == ref[f"{mode}_objects"][theirs].tolist(), f"{image.name} {mode}"
        assert got["attribute_id"][mine].tolist() == ref[f"{mode}_attrs"][theirs].tolist(), f"{image.name} {mode}"
        if mode == "fix36":
            assert len(ours_rows) == 36
        else:
            assert 10 <= len(ours_rows) <= 100
