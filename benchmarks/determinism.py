"""What is deterministic: PFAN trained on a synthetic corpus in separate processes, (a) twice with the same
seed and thread count, (b) with another intra-op thread count, (c) with another seed. Prints, per run, the
largest absolute weight difference to run (a) and the test metrics.

    .venv/bin/python benchmarks/determinism.py [--images 300] [--epochs 3] [--threads-other 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from itmatch.corpus.data import Corpus
from itmatch.corpus.synthetic import write_synthetic_corpus
from itmatch.evaluation.evaluate import evaluate_checkpoint

RUNNER = r"""
import json, sys
from itmatch.corpus.data import Corpus, DataPaths
from itmatch.training.loop import train_model
a = json.loads(sys.argv[1])
corpus = Corpus(DataPaths(**a["paths"]), frozenset({"blocks"}))
train_model("pfan", a["model"], a["train"], corpus, a["out"] + "/model.pt", a["out"] + "/log.csv", a["out"] + "/.s.pt")
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=300, help="training images of the synthetic corpus")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads-other", type=int, default=2)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="determinism-"))
    paths = write_synthetic_corpus(root / "corpus", n_train=args.images, n_val=50, n_test=100, R=8, D=64)
    model = {"embed_dim": 64, "word_dim": 32, "block_dim": 16, "direction": "t2i"}
    base = {"num_workers": 0, "device": "cpu", "precision": "fp32",
            "epochs": args.epochs, "batch_size": 32, "lr": 2e-3, "val_max_images": 50, "checkpoint_every_steps": 0,
            "threads": 1, "seed": 0}
    runs = {"a: seed 0, 1 thread": base, "a again (new process)": base,
            f"b: {args.threads_other} threads": {**base, "threads": args.threads_other},
            "c: seed 1": {**base, "seed": 1}}
    corpus = Corpus(paths, frozenset({"blocks"}))
    ref = None
    for k, (name, train) in enumerate(runs.items()):
        out = root / f"run{k}"
        out.mkdir()
        subprocess.run([sys.executable, "-c", RUNNER, json.dumps({"paths": paths.__dict__, "model": model,
                                                                  "train": train, "out": str(out)})],
                       check=True, capture_output=True)
        sd = torch.load(out / "model.pt", weights_only=True)["parts"][0]["state_dict"]
        ref = ref or sd
        diff = max(float((sd[p].double() - ref[p].double()).abs().max()) for p in sd if sd[p].is_floating_point())
        m = evaluate_checkpoint(str(out / "model.pt"), corpus)[0]["1k"]
        print(f"{name:26s} max |Δw| {diff:.3g}  test i2t R@1 {m['i2t']['r1']:.1f}  t2i R@1 {m['t2i']['r1']:.1f}  "
              f"rSum {m['rsum']:.1f}", flush=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} default threads; corpus in {root}")


if __name__ == "__main__":
    main()
