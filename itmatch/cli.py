"""The ``itmatch`` command (console script; ``python -m itmatch.cli``). Subcommands:

- ``itmatch recipe MODEL DATASET``: the resolved training recipe as JSON ``{training, model, sources}``;
- ``itmatch recipe --markdown``: docs/recipes.md (every model's recipes with their sources);
- ``itmatch import-checkpoint {scan,pfan} PATH [PATH] --dataset NAME --out RUN``: released SCAN / PFAN
  ``model_best.pth.tar`` files (one per direction) → RUN/model.pt + RUN/import.json
  (:mod:`itmatch.models.released`); ``snakemake results/imported/RUN/metrics.json`` evaluates it.

``--configfile`` adds override files as Snakemake's ``--configfile`` does. Bad input exits with status 2 and
a message naming the valid choices.
"""

from __future__ import annotations

import argparse
import json
import sys

from itmatch.config import ConfigError
from itmatch.recipes import CONFIG_PATH, load_recipe_config, markdown, resolve


def _recipe(args: argparse.Namespace) -> int:
    config = load_recipe_config(args.config, args.configfile)
    if args.markdown:
        if args.model or args.dataset:
            raise ValueError("itmatch recipe --markdown takes no MODEL / DATASET")
        sys.stdout.write(markdown(config))
        return 0
    if not (args.model and args.dataset):
        raise ValueError("itmatch recipe needs MODEL and DATASET (or --markdown)")
    json.dump(resolve(config, args.model, args.dataset), sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")
    return 0


def _import_checkpoint(args: argparse.Namespace) -> int:
    from itmatch.models.released import import_run  # torch only when importing

    vocab = args.vocab or f"results/text/{args.dataset}/vocab.json"
    record = import_run(args.model, args.paths, args.dataset, args.out, vocab_json=vocab)
    json.dump({k: record[k] for k in ("model", "dataset", "settings", "files")}, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


def _add_import_checkpoint(sub) -> None:
    imp = sub.add_parser("import-checkpoint", help="turn released SCAN / PFAN model_best.pth.tar files into a run",
                         description="Released SCAN / PFAN checkpoints (one file per direction: a t2i and/or an "
                                     "i2t model, averaged like the papers' t-i + i-t) → RUN/model.pt and "
                                     "RUN/import.json. Evaluate with: snakemake results/imported/NAME/metrics.json "
                                     "(RUN = results/imported/NAME). Read without running code from the file.")
    imp.add_argument("model", choices=("scan", "pfan"), help="whose code wrote the files")
    imp.add_argument("paths", nargs="+", metavar="PATH", help="model_best.pth.tar (one per direction)")
    imp.add_argument("--dataset", required=True, help="the dataset the model was trained for (e.g. a precomp one)")
    imp.add_argument("--out", required=True, help="run folder, e.g. results/imported/scan_f30k")
    imp.add_argument("--vocab", help="vocab.json to check the word count against "
                                     "(default: results/text/DATASET/vocab.json, when built)")
    imp.set_defaults(func=_import_checkpoint)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="itmatch", description="itmatch workflow tools")
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("recipe", help="print the resolved training recipe of MODEL on DATASET (JSON)")
    rec.add_argument("model", nargs="?", help="scan | pfan | caan | smfea | glfn | bssan")
    rec.add_argument("dataset", nargs="?", help="coco | f30k | shapes")
    rec.add_argument("--markdown", action="store_true", help="print docs/recipes.md instead")
    rec.add_argument("--config", default=str(CONFIG_PATH), help="config file (default: config/config.yaml)")
    rec.add_argument("--configfile", action="append", default=[], help="override file merged over --config")
    rec.set_defaults(func=_recipe)
    _add_import_checkpoint(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, ConfigError, FileNotFoundError) as e:
        print(f"itmatch {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
