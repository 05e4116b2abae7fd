"""The ``itmatch`` command (console script; ``python -m itmatch.cli``). Subcommands:

- ``itmatch recipe MODEL DATASET [--variant NAME]``: the resolved training recipe as JSON ``{training, model,
  sources}`` (of an ablation variant: plus ``variant``, its description, source and changed keys);
- ``itmatch recipe --markdown``: docs/recipes.md (every model's recipes with their sources).

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
        if args.model or args.dataset or args.variant:
            raise ValueError("itmatch recipe --markdown takes no MODEL / DATASET / --variant")
        sys.stdout.write(markdown(config))
        return 0
    if not (args.model and args.dataset):
        raise ValueError("itmatch recipe needs MODEL and DATASET (or --markdown)")
    json.dump(resolve(config, args.model, args.dataset, args.variant), sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="itmatch", description="itmatch workflow tools")
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("recipe", help="print the resolved training recipe of MODEL on DATASET (JSON)")
    rec.add_argument("model", nargs="?", help="scan | pfan | caan | smfea | glfn | bssan")
    rec.add_argument("dataset", nargs="?", help="coco | f30k | shapes")
    rec.add_argument("--variant", help="an ablation variant of MODEL (config variants.MODEL.NAME)")
    rec.add_argument("--markdown", action="store_true", help="print docs/recipes.md instead")
    rec.add_argument("--config", default=str(CONFIG_PATH), help="config file (default: config/config.yaml)")
    rec.add_argument("--configfile", action="append", default=[], help="override file merged over --config")
    rec.set_defaults(func=_recipe)
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
