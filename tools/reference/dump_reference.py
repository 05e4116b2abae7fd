"""Dump the reference bottom-up-attention extractor's stage outputs for the fixture images (``.npz`` per image).

Runs INSIDE an environment where the reference is importable (its own Python: torch, detectron2 built in place,
MILVLG's NMS extension built), never in ours; nothing of the reference is copied into this repository. Given the
sources of MILVLG/bottom-up-attention.pytorch (``--reference-root``) and of detectron2 (``--detectron2-root``,
default ``<reference-root>/detectron2``, the submodule's place), it

1. builds the configs the reference's extractor builds (``utils/extract_features_singlegpu.py``: ``setup`` with
   ``--mode caffe --extract-mode roi_feats``) from ``configs/caffe/test-caffe-r101-fix36.yaml`` on the CPU, once with
   ``--min-max-boxes 36,36`` (fix36) and once with the defaults (adaptive: MIN_BOXES 10, MAX_BOXES 100,
   CONF_THRESH 0.2; ``bua/caffe/config.py``);
2. runs the reference's own per-image loop ``extract_feat_singlegpu`` (model built by ``DefaultTrainer.build_model``,
   weights loaded by ``DetectionCheckpointer(...).resume_or_load(cfg.MODEL.WEIGHTS)``, ``cv2.imread``,
   ``get_image_blob``, the model, ``save_roi_features``) for fix36, then calls ``generate_npz(1, ...)`` (the
   reference's writer, ``save_roi_features``) again on the same model outputs with the adaptive config;
3. captures stages with forward hooks on the reference's modules (backbone → res4; proposal generator → proposals
   and their scores; RPN head → raw logits/deltas; ROI pooler → pooled tensor) and, through ``sys.setprofile``,
   the arguments and the locals ``max_conf`` / ``keep_boxes`` of the reference's ``save_roi_features``, so the
   selection is the reference's, not a re-implementation; the written regions (``x``, ``bbox``, ``info``) are read
   back from the files the reference writes, and checked to be exactly the captured rows.

Two stand-ins are installed only when the module is missing: ``apex`` (``bua/caffe/modeling/layers/nms.py`` uses
only ``amp.float_function``, which returns the function unchanged unless amp was initialised, so an identity is
exact) and ``ray`` (imported at module level by ``utils/__init__.py`` for multi-GPU extraction; unused here).

Usage (in the reference's environment; the checkpoint from ours:
``python -c "from itmatch.features.detector.seeded import write_seeded_checkpoint as w; w('seeded.pth')"``)::

    python tools/reference/dump_reference.py --reference-root /path/to/bottom-up-attention.pytorch \\
        --checkpoint seeded.pth --images tests/fixtures/reference/images --out tests/fixtures/reference
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
import types
import zlib
from pathlib import Path
from typing import Any

import numpy as np

SAMPLE = 4096  # sampled elements per large tensor (blob, res4, pooled, RPN head outputs)
FIRST_ROWS = 32  # proposal rows always stored (besides all rows chosen in either mode)
CONFIG = "configs/caffe/test-caffe-r101-fix36.yaml"
MODES = {"fix36": "36,36", "adaptive": "min_max_default"}  # the reference's --min-max-boxes values


def install_stand_ins() -> list[str]:
    """Identity ``apex.amp.float_function`` and a no-op ``ray`` when those packages are absent; returns names."""
    installed = []
    if importlib.util.find_spec("apex") is None:
        apex, amp = types.ModuleType("apex"), types.ModuleType("apex.amp")
        amp.float_function = lambda fn: fn  # apex: a pass-through unless amp.init() was called
        apex.amp = amp
        sys.modules.update({"apex": apex, "apex.amp": amp})
        installed.append("apex")
    if importlib.util.find_spec("ray") is None:
        ray, actor = types.ModuleType("ray"), types.ModuleType("ray.actor")

        def remote(*args: Any, **kwargs: Any) -> Any:
            if len(args) == 1 and callable(args[0]) and not kwargs:
                return args[0]
            return lambda fn: fn

        ray.remote, ray.actor, actor.ActorHandle = remote, actor, object
        sys.modules.update({"ray": ray, "ray.actor": actor})
        installed.append("ray")
    return installed


def sample(t: Any, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(sorted flat indices, float32 values) of a seeded sample of ``t`` (numpy or torch)."""
    a = np.asarray(t, dtype=np.float32).reshape(-1)
    idx = np.sort(rng.choice(a.size, size=min(SAMPLE, a.size), replace=False)).astype(np.int64)
    return idx, a[idx]


def sorted_gaps(values: np.ndarray) -> np.ndarray:
    s = np.sort(values)[::-1]
    return s[:-1] - s[1:]


def selection_margin(max_conf: np.ndarray, n_chosen: int, thresh: float) -> float:
    """The reference's own score gap deciding which proposals were chosen: the gap between the last chosen and
    the first unchosen score when a count limit applied, else the smallest distance of any score to the threshold."""
    n_pass = int((max_conf >= thresh).sum())
    if n_chosen != n_pass:  # MIN_BOXES or MAX_BOXES cut the sorted scores
        s = np.sort(max_conf)[::-1]
        return float(s[n_chosen - 1] - s[n_chosen]) if n_chosen < s.size else float("inf")
    return float(np.abs(max_conf - thresh).min())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-root", type=Path, required=True,
                        help="MILVLG/bottom-up-attention.pytorch sources (with bua/caffe/modeling/_C built)")
    parser.add_argument("--detectron2-root", type=Path, default=None,
                        help="detectron2 sources built in place (default: <reference-root>/detectron2)")
    parser.add_argument("--checkpoint", type=Path, required=True, help="weights, e.g. the seeded checkpoint")
    parser.add_argument("--images", type=Path, required=True, help="folder of images (all files are used)")
    parser.add_argument("--out", type=Path, required=True, help="folder for <image stem>.npz and reference.json")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--reference-rev", default="4dbce86", help="revision of the reference sources (recorded)")
    parser.add_argument("--detectron2-rev", default="be792b9", help="revision of detectron2 (recorded)")
    parser.add_argument("--keep-raw", type=Path, default=None,
                        help="also keep the reference's own output files here (<mode>/<stem>.npz)")
    args = parser.parse_args(argv)
    for name in ("checkpoint", "images", "out", "keep_raw"):  # before the chdir below
        if getattr(args, name) is not None:
            setattr(args, name, getattr(args, name).resolve())

    ref_root = args.reference_root.resolve()
    d2_root = (args.detectron2_root or ref_root / "detectron2").resolve()
    for p, what in ((ref_root / "bua", "the reference's bua package"), (d2_root / "detectron2", "detectron2")):
        if not p.is_dir():
            parser.error(f"{p} not found ({what})")
    if not args.checkpoint.is_file():
        parser.error(f"checkpoint {args.checkpoint} does not exist")
    images = sorted(p.name for p in args.images.iterdir() if p.is_file() and not p.name.startswith("."))
    if not images:
        parser.error(f"no images in {args.images}")
    stand_ins = install_stand_ins()
    sys.path[:0] = [str(ref_root), str(d2_root)]
    os.chdir(ref_root)  # the reference resolves its config and sys.path.append('detectron2') relative to its root

    import cv2
    import torch
    import torchvision
    import utils.extract_features_singlegpu as single  # the reference's single-process extractor
    from detectron2.engine import DefaultTrainer
    from utils.extract_utils import save_roi_features

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bua-ref-"))
    raw = args.keep_raw or work / "raw"
    cfgs, run_args = {}, {}
    for mode, min_max in MODES.items():
        run_args[mode] = argparse.Namespace(
            config_file=CONFIG, mode="caffe", extract_mode="roi_feats", min_max_boxes=min_max, gpu_id="0",
            num_cpus=1, resume=False, image_dir=str(args.images.resolve()), output_dir=str(raw / mode),
            bbox_dir="bbox", opts=["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", str(args.checkpoint.resolve()),
                                   "OUTPUT_DIR", str(work / f"d2-{mode}")])
        (raw / mode).mkdir(parents=True, exist_ok=True)
        for old in (raw / mode).glob("*.npz"):  # the reference skips images whose output exists
            old.unlink()
        cfgs[mode] = single.setup(run_args[mode])  # the reference's cfg: EXTRACT_FEATS True, MODE 1, MIN/MAX

    # --- capture: forward hooks on the model the reference builds, profile hook on save_roi_features ---
    stages: list[dict[str, Any]] = []
    models = []
    build = DefaultTrainer.build_model

    def build_and_hook(cls: Any, cfg: Any) -> Any:
        model = build.__func__(cls, cfg)
        models.append(model)

        def new_image(_m: Any, _inp: Any) -> None:
            stages.append({})

        def keep(name: str, fn: Any) -> Any:
            def hook(_m: Any, _inp: Any, out: Any) -> None:
                stages[-1][name] = fn(out)
            return hook

        model.register_forward_pre_hook(new_image)
        model.backbone.register_forward_hook(keep("res4", lambda o: o["res4"][0].detach().clone()))
        model.proposal_generator.rpn_head.register_forward_hook(
            keep("rpn_head", lambda o: (o[0][0][0].detach().clone(), o[1][0][0].detach().clone())))
        model.proposal_generator.register_forward_hook(keep("proposals", lambda o: (
            o[0][0].proposal_boxes.tensor.detach().clone(), o[0][0].objectness_logits.detach().clone())))
        model.roi_heads.pooler.register_forward_hook(keep("pooled", lambda o: o.detach().clone()))
        return model

    DefaultTrainer.build_model = classmethod(build_and_hook)
    calls: list[dict[str, Any]] = []

    def profile(frame: Any, event: str, _arg: Any) -> None:
        if frame.f_code is not save_roi_features.__code__:
            return
        if event == "call":
            calls.append({"args": dict(frame.f_locals)})
        elif event == "return":
            calls[-1]["max_conf"] = frame.f_locals["max_conf"].clone()
            calls[-1]["keep_boxes"] = frame.f_locals["keep_boxes"].clone()

    t0 = time.time()
    sys.setprofile(profile)
    try:
        single.extract_feat_singlegpu(0, images, cfgs["fix36"], run_args["fix36"])  # the reference's loop
        fix36_calls = list(calls)
        calls.clear()
        for c in fix36_calls:  # the same model outputs through the reference's writer with the adaptive config
            a = c["args"]
            single.generate_npz(1, run_args["adaptive"], cfgs["adaptive"], a["im_file"], a["im"], a["dataset_dict"],
                                a["boxes"], a["scores"], a["features_pooled"], a["attr_scores"])
        adaptive_calls = list(calls)
    finally:
        sys.setprofile(None)
        DefaultTrainer.build_model = build
    seconds = time.time() - t0
    if not (len(fix36_calls) == len(adaptive_calls) == len(stages) == len(images)):
        raise SystemExit(f"captured {len(fix36_calls)}/{len(adaptive_calls)} writer calls and {len(stages)} forwards "
                         f"for {len(images)} images (an image the reference could not read?)")
    anchors = next(iter(models[0].proposal_generator.anchor_generator.cell_anchors))  # a BufferList

    args.out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {}
    for c36, cad, st in zip(fix36_calls, adaptive_calls, stages, strict=True):
        a = c36["args"]
        stem = a["im_file"].split(".")[0]
        rng = np.random.default_rng(zlib.crc32(stem.encode()))
        blob = a["dataset_dict"]["image"].permute(1, 2, 0).numpy()  # H', W', 3 (BGR, mean-subtracted, resized)
        scale = float(a["dataset_dict"]["im_scale"])
        boxes, scores = a["boxes"][0], a["scores"][0]
        feats, attr = a["features_pooled"][0], a["attr_scores"][0]
        prop_boxes, prop_scores = st["proposals"]
        if not torch.equal(prop_boxes, boxes):
            raise SystemExit(f"{stem}: the written boxes are not the RPN proposals (extractor mode 1 expected)")
        out: dict[str, np.ndarray] = {
            "image_hw": np.array(a["im"].shape[:2], dtype=np.int64), "scale": np.float64(scale),
            "blob_shape": np.array(blob.shape, dtype=np.int64), "blob_sum": np.float64(blob.astype(np.float64).sum()),
        }
        out["blob_idx"], out["blob_val"] = sample(blob, rng)
        res4 = st["res4"].numpy()
        out["res4_shape"] = np.array(res4.shape, dtype=np.int64)
        out["res4_idx"], out["res4_val"] = sample(res4, rng)
        out["res4_chan_mean"] = res4.astype(np.float64).mean(axis=(1, 2))
        logits, deltas = (t.numpy() for t in st["rpn_head"])
        out["rpn_logits_shape"] = np.array(logits.shape, dtype=np.int64)
        out["rpn_logits_idx"], out["rpn_logits_val"] = sample(logits, rng)
        out["rpn_deltas_shape"] = np.array(deltas.shape, dtype=np.int64)
        out["rpn_deltas_idx"], out["rpn_deltas_val"] = sample(deltas, rng)
        out["proposals"] = prop_boxes.numpy().astype(np.float32)
        out["proposal_scores"] = prop_scores.numpy().astype(np.float32)
        pooled = st["pooled"].numpy()
        out["pooled_shape"] = np.array(pooled.shape, dtype=np.int64)
        out["pooled_idx"], out["pooled_val"] = sample(pooled, rng)
        max_conf = c36["max_conf"].numpy()
        if not np.array_equal(max_conf, cad["max_conf"].numpy()):
            raise SystemExit(f"{stem}: max_conf differs between the two writer calls")
        out["max_conf"] = max_conf.astype(np.float32)
        chosen = {"fix36": c36["keep_boxes"].numpy(), "adaptive": cad["keep_boxes"].numpy()}
        rows = np.union1d(np.union1d(chosen["fix36"], chosen["adaptive"]), np.arange(min(FIRST_ROWS, len(boxes))))
        out["rows"] = rows.astype(np.int64)
        rows_t = torch.from_numpy(out["rows"])
        out["feats"] = feats[rows_t].numpy().astype(np.float32)
        out["cls_prob"] = scores[rows_t].numpy().astype(np.float32)
        out["attr_prob"] = attr[rows_t].numpy().astype(np.float32)
        info_modes = {}
        for mode, keep in chosen.items():
            written = np.load(raw / mode / f"{stem}.npz", allow_pickle=True)  # what the reference wrote
            info = written["info"].item()
            dets = (boxes / scale).numpy()
            if not (np.array_equal(written["bbox"], dets[keep]) and np.array_equal(written["x"], feats[keep].numpy())
                    and int(written["num_bbox"]) == len(keep)):
                raise SystemExit(f"{stem} {mode}: the written regions are not the captured rows {keep.tolist()}")
            out[f"{mode}_rows"] = keep.astype(np.int64)
            out[f"{mode}_boxes"] = np.asarray(written["bbox"], dtype=np.float32)
            out[f"{mode}_objects"] = np.asarray(info["objects_id"], dtype=np.int64)
            out[f"{mode}_object_conf"] = np.asarray(info["objects_conf"], dtype=np.float32)
            out[f"{mode}_attrs"] = np.asarray(info["attrs_id"], dtype=np.int64)
            out[f"{mode}_attr_conf"] = np.asarray(info["attrs_conf"], dtype=np.float32)
            # the written features ("x") are feats[keep] exactly (checked above): not stored twice (fixture size);
            # they are ``feats[np.searchsorted(rows, {mode}_rows)]``
            thresh = float(cfgs[mode].MODEL.BUA.EXTRACTOR.CONF_THRESH)
            margin = selection_margin(max_conf, len(keep), thresh)
            order_gap = float(sorted_gaps(max_conf[keep]).min()) if len(keep) > 1 else float("inf")
            out[f"{mode}_selection_margin"] = np.float64(margin)
            info_modes[mode] = {"regions": int(len(keep)), "pass_conf_thresh": int((max_conf >= thresh).sum()),
                                "selection_margin": margin, "min_gap_within_chosen": order_gap}
        path = args.out / f"{stem}.npz"
        tmp = args.out / f".{stem}.tmp.npz"
        np.savez_compressed(tmp, **out)
        tmp.replace(path)
        summary[stem] = {"image_hw": out["image_hw"].tolist(), "blob_hw": out["blob_shape"][:2].tolist(),
                         "scale": scale, "proposals": int(len(boxes)), **info_modes,
                         "bytes": path.stat().st_size}
        print(f"{stem}: {json.dumps(summary[stem])}", flush=True)

    import detectron2
    meta = {
        "reference": {"MILVLG/bottom-up-attention.pytorch": args.reference_rev,
                      "facebookresearch/detectron2": args.detectron2_rev, "config": CONFIG,
                      "stand_ins": stand_ins},
        "settings": {mode: {"MIN_BOXES": cfgs[mode].MODEL.BUA.EXTRACTOR.MIN_BOXES,
                            "MAX_BOXES": cfgs[mode].MODEL.BUA.EXTRACTOR.MAX_BOXES,
                            "CONF_THRESH": cfgs[mode].MODEL.BUA.EXTRACTOR.CONF_THRESH,
                            "EXTRACTOR.MODE": cfgs[mode].MODEL.BUA.EXTRACTOR.MODE} for mode in MODES},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "opencv": cv2.__version__, "numpy": np.__version__,
                     "detectron2": detectron2.__version__, "threads": args.threads, "machine": platform.machine()},
        "anchors": anchors.tolist(),
        "checkpoint_sha256": _sha256(args.checkpoint),
        "seconds": round(seconds, 1),
        "images": summary,
    }
    tmp = args.out / ".reference.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    tmp.replace(args.out / "reference.json")
    print(f"wrote {len(summary)} files to {args.out} in {seconds:.0f} s")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


if __name__ == "__main__":
    main()
