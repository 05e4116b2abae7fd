"""Time the reference bottom-up-attention extractor on a folder of images (its own per-image loop).

Runs INSIDE the reference's environment (see ``dump_reference.py`` for what that is and for the ``apex``/``ray``
stand-ins); ``benchmarks/reference_bench.py`` starts it with the reference's Python. It builds the reference's
fix36 config (``configs/caffe/test-caffe-r101-fix36.yaml``, ``--min-max-boxes 36,36``, extractor mode 1) on the
requested device, and runs the reference's ``extract_feat_singlegpu`` (``cv2.imread``, ``get_image_blob``, model,
``save_roi_features`` writing one ``.npz`` per image) over a warm-up copy of the first image followed by all
images. Seconds per image are taken between consecutive calls of the reference's ``get_image_blob`` (the last one
up to the loop's end), so model construction and weight loading are not counted; the warm-up image is left out.
Prints one JSON line: ``{"device", "threads", "seconds": [...], "images_per_s"}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dump_reference import CONFIG, install_stand_ins  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-root", type=Path, required=True)
    parser.add_argument("--detectron2-root", type=Path, default=None)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args(argv)
    ref_root = args.reference_root.resolve()
    d2_root = (args.detectron2_root or ref_root / "detectron2").resolve()
    images = sorted(p for p in args.images.resolve().iterdir() if p.is_file() and not p.name.startswith("."))
    if not images:
        parser.error(f"no images in {args.images}")
    install_stand_ins()
    sys.path[:0] = [str(ref_root), str(d2_root)]
    os.chdir(ref_root)

    import torch
    import utils.extract_features_singlegpu as single  # the reference's single-process extractor

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bua-ref-bench-"))
    folder = work / "images"
    folder.mkdir()
    names = [f"0warmup{images[0].suffix}"] + [p.name for p in images]
    (folder / names[0]).symlink_to(images[0])
    for p in images:
        (folder / p.name).symlink_to(p)
    run = argparse.Namespace(
        config_file=CONFIG, mode="caffe", extract_mode="roi_feats", min_max_boxes="36,36", gpu_id="0", num_cpus=1,
        resume=False, image_dir=str(folder), output_dir=str(work / "out"), bbox_dir="bbox",
        opts=["MODEL.DEVICE", args.device, "MODEL.WEIGHTS", str(args.checkpoint.resolve()),
              "OUTPUT_DIR", str(work / "d2")])
    (work / "out").mkdir()
    cfg = single.setup(run)
    stamps: list[float] = []
    blob = single.get_image_blob

    def timed_blob(*a, **k):  # noqa: ANN002, ANN003 - the reference's signature
        if args.device == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        return blob(*a, **k)

    single.get_image_blob = timed_blob
    single.extract_feat_singlegpu(0, names, cfg, run)
    if args.device == "cuda":
        torch.cuda.synchronize()
    stamps.append(time.perf_counter())
    if len(stamps) != len(names) + 1:
        raise SystemExit(f"the reference processed {len(stamps) - 1} of {len(names)} images")
    seconds = [b - a for a, b in zip(stamps[1:-1], stamps[2:], strict=True)]  # without the warm-up image
    print(json.dumps({"device": args.device, "threads": args.threads, "seconds": seconds,
                      "images_per_s": len(seconds) / sum(seconds)}))


if __name__ == "__main__":
    main()
