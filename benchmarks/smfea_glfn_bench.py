"""Encoding and scoring speed of SMFEA (global vectors: score = one matrix product) and GLFN (two stacked
cross-attention branches), at the papers' sizes from ``config/config.yaml``, on random inputs.

Reuses :mod:`pairwise_bench`'s inputs and timing, adding what these models read: referral-tree labels,
per-token BERT features, region tag vectors and block indices. Example::

    .venv/bin/python benchmarks/smfea_glfn_bench.py --images 100 --captions 500 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pairwise_bench import REPO, bench, make_inputs  # noqa: E402

from itmatch.config import load_config  # noqa: E402
from itmatch.training.settings import model_settings  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smfea", "glfn"])
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--captions", type=int, default=500)
    ap.add_argument("--regions", type=int, default=36)
    ap.add_argument("--bert-dim", type=int, default=768)
    ap.add_argument("--K", type=int, default=16)
    ap.add_argument("--L", type=int, default=15)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    images, captions = make_inputs(args.images, args.captions, args.regions, 2048, 10000, 8, 16, device)
    g = torch.Generator().manual_seed(2)
    I, R, C, W = args.images, args.regions, args.captions, captions["tokens"].shape[1]
    images["tag_vectors"] = torch.randn(I, R, args.bert_dim, generator=g).to(device)
    images["block_index"] = torch.randint(0, args.K * args.K, (I, R, args.L), generator=g).to(device)
    images["block_weight"] = torch.softmax(torch.randn(I, R, args.L, generator=g), -1).to(device)
    captions["bert"] = torch.randn(C, W, args.bert_dim, generator=g).to(device)
    captions["tree_labels"] = torch.randint(-1, 50, (C, 7), generator=g).to(device)
    captions["concept_labels"] = (torch.rand(C, 300, generator=g) < 0.02).float().to(device)   # CVSE: 300 concepts
    data_info = {"vocab_size": 10000, "feature_dim": 2048, "tag_dim": args.bert_dim, "bert_dim": args.bert_dim,
                 "blocks_K": args.K, "n_entities": 1440, "n_relations": 247, "n_concepts": 300}
    config = load_config(REPO / "config" / "config.yaml")
    for name in args.models:
        cfg = model_settings(config, name, None)
        print(json.dumps(bench(name, cfg, images, captions, data_info, args.repeat, device)), flush=True)


if __name__ == "__main__":
    main()
