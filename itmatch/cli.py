"""The ``itmatch`` command (console script; ``python -m itmatch.cli``). Subcommands:

- ``itmatch recipe MODEL DATASET [--variant NAME]``: the resolved training recipe as JSON ``{training, model,
  sources}`` (of an ablation variant: plus ``variant``, its description, source and changed keys);
- ``itmatch recipe --markdown``: docs/recipes.md (every model's recipes with their sources);
- ``itmatch export FEATURES --format scan-precomp|npz|tsv --out DIR``: region features in SCAN's / PFAN's
  ``.npy``, MILVLG's per-image ``.npz`` or the bottom-up-attention TSV layout (:mod:`itmatch.features.exporters`).
- ``itmatch retrieve RUN --text "..." | --image ID_OR_FILE [--k 10] [--split test] [--json]``: the top-k
  images of a sentence or captions of an image from a trained run (:mod:`itmatch.retrieve`);
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
        if args.model or args.dataset or args.variant:
            raise ValueError("itmatch recipe --markdown takes no MODEL / DATASET / --variant")
        sys.stdout.write(markdown(config))
        return 0
    if not (args.model and args.dataset):
        raise ValueError("itmatch recipe needs MODEL and DATASET (or --markdown)")
    json.dump(resolve(config, args.model, args.dataset, args.variant), sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")
    return 0


def _export(args: argparse.Namespace) -> int:
    from itmatch.features.exporters import export_features  # numpy/h5py only when exporting

    summary = export_features(args.features, args.format, args.out, images=args.images, captions=args.captions,
                              blocks=args.blocks, tsv_tags=args.tsv_tags, npz_name=args.npz_name,
                              block=args.block, overwrite=args.overwrite)
    json.dump(summary, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


# = itmatch.features.exporters.FORMATS (repeated so that `itmatch --help` imports no numpy/h5py; a test checks)
EXPORT_FORMATS = ("scan-precomp", "npz", "tsv")


def _add_export(sub) -> None:
    ex = sub.add_parser("export", help="write region features in SCAN/PFAN .npy, MILVLG .npz or BUTD TSV layout",
                        description="Export regions.h5 (and its images.parquet, captions.parquet, blocks.h5 by "
                                    "the contract's paths) into a new folder, written atomically.")
    ex.add_argument("features", help="results/features/DATASET/regions.h5 (or its folder)")
    ex.add_argument("--format", required=True, choices=EXPORT_FORMATS,
                    help="scan-precomp: {split}_ims.npy, _caps.txt, _ids.txt (+ PFAN _boxes.npy); "
                         "npz: one MILVLG-style .npz per image; tsv: bottom-up-attention regions.tsv")
    ex.add_argument("--out", required=True, help="output folder (must not exist or be empty, see --overwrite)")
    ex.add_argument("--images", help="images.parquet (default: results/data/DATASET/images.parquet)")
    ex.add_argument("--captions", help="captions.parquet (default: results/data/DATASET/captions.parquet)")
    ex.add_argument("--blocks", help="blocks.h5 for PFAN's *_boxes.npy (default: beside FEATURES, if there)")
    ex.add_argument("--tsv-tags", action="store_true",
                    help="tsv: append objects_id, objects_conf, attrs_id, attrs_conf fields (10 in all)")
    ex.add_argument("--npz-name", choices=("stem", "image_id"), default="stem",
                    help="npz: name files by the image file's stem (as MILVLG) or by image id")
    ex.add_argument("--block", type=int, default=256, help="images read at a time (memory bound)")
    ex.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    ex.set_defaults(func=_export)


def _retrieve(args: argparse.Namespace) -> int:
    from itmatch.retrieve import Retriever, format_table  # torch only when retrieving

    if args.k < 1:
        raise ValueError(f"--k must be at least 1, got {args.k}")
    r = Retriever(args.run, split=args.split, device=args.device, precision=args.precision, config_path=args.config,
                  configfiles=args.configfile)
    result = r.text(args.text, args.k) if args.text is not None else r.image(args.image, args.k)
    if args.json:
        json.dump(result.as_dict(), sys.stdout, indent=1, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_table(result))
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
    rec.add_argument("--variant", help="an ablation variant of MODEL (config variants.MODEL.NAME)")
    rec.add_argument("--markdown", action="store_true", help="print docs/recipes.md instead")
    rec.add_argument("--config", default=str(CONFIG_PATH), help="config file (default: config/config.yaml)")
    rec.add_argument("--configfile", action="append", default=[], help="override file merged over --config")
    rec.set_defaults(func=_recipe)
    _add_export(sub)
    ret = sub.add_parser(
        "retrieve", help="top-k images of a sentence, or captions of an image, from a trained run",
        description="Score a query with the trained model of RUN against every image (--text) or caption (--image) "
                    "of a split of its dataset and print the best k. RUN is a results folder such as "
                    "results/pfan/shapes (its workflow directory holds the dataset's artifacts).",
        epilog='example: itmatch retrieve results/pfan/shapes --text "a red circle" --k 5')
    ret.add_argument("run", metavar="RUN", help="results folder of a trained model, e.g. results/pfan/shapes")
    query = ret.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="a sentence: retrieve images")
    query.add_argument("--image", metavar="IMAGE_ID_OR_FILE",
                       help="an image id of the dataset, or an image file (regions extracted with the dataset's "
                            "detector): retrieve captions")
    ret.add_argument("--k", type=int, default=10, help="how many results (default 10)")
    ret.add_argument("--split", default="test", help="split searched (default test)")
    ret.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ret.add_argument("--device", default="auto", help="auto (CUDA when there is one) | cpu | cuda")
    ret.add_argument("--precision", default="fp32", help="scoring precision: fp32 (default) | bf16 | fp16 | auto")
    ret.add_argument("--config", default=None,
                     help="config file when a query needs it (new image file, inputs of SMFEA / GLFN); default: "
                          "config/config.yaml of RUN's workflow directory")
    ret.add_argument("--configfile", action="append", default=[], help="override file merged over --config")
    ret.set_defaults(func=_retrieve)
    _add_import_checkpoint(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, ConfigError, OSError) as e:
        print(f"itmatch {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
