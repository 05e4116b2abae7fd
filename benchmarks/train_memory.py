"""Peak RSS of training at two dataset sizes (it should not grow with the number of images).

    .venv/bin/python benchmarks/train_memory.py --sizes 1000 10000

For each size, a synthetic corpus in the contract's formats (regions.h5 float16, one image per chunk) is
written to a temporary folder, then a fresh process trains SCAN t2i for ``--steps`` steps with DataLoader
workers and reports its peak RSS (own + workers, from getrusage). Prints one JSON line per size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, resource, sys
from itmatch.corpus.data import Corpus, DataPaths
from itmatch.training.loop import train_model
a = json.loads(sys.argv[1])
corpus = Corpus(DataPaths(**a["paths"]))
try:
    train_model("scan", {"embed_dim": a["embed"], "word_dim": 300, "direction": "t2i"},
                {"epochs": 1, "batch_size": 128, "num_workers": a["workers"], "threads": a["threads"],
                 "checkpoint_every_steps": 0, "val_max_images": 100},
                corpus, a["out"] + "/model.pt", a["out"] + "/log.csv", a["out"] + "/.state.pt",
                stop_after_steps=a["steps"])
except SystemExit:
    pass
own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"peak_rss_main_mb": own / 1024, "peak_rss_worker_mb": kids / 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--regions", type=int, default=36)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--embed", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    from itmatch.corpus.synthetic import write_synthetic_corpus

    for n in a.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.time()
            paths = write_synthetic_corpus(tmp, n_train=n, n_val=100, n_test=10, R=a.regions, D=a.dim, n_words=500,
                                           chunk=256)
            size_mb = os.path.getsize(paths.regions) / 2 ** 20
            t_write = time.time() - t0
            arg = {"paths": paths.__dict__, "embed": a.embed, "workers": a.workers, "threads": a.threads,
                   "steps": a.steps, "out": tmp}
            t0 = time.time()
            res = subprocess.run([sys.executable, "-c", CHILD, json.dumps(arg)], capture_output=True, text=True,
                                 check=True)
            line = json.loads(res.stdout.strip().splitlines()[-1])
            print(json.dumps({"images": n, "regions_h5_mb": round(size_mb), "steps": a.steps,
                              "write_seconds": round(t_write, 1), "train_seconds": round(time.time() - t0, 1),
                              **{k: round(v) for k, v in line.items()}}), flush=True)


if __name__ == "__main__":
    main()
