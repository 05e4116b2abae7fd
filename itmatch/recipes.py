"""Training recipes of every model × dataset: resolved settings, their sources, and docs/recipes.md.

The settings come from ``config/config.yaml`` through :func:`itmatch.training.settings.recipe` (the function
the train rules use), validated and completed with the schema's defaults exactly as the Snakefile does
(:func:`snakemake.utils.validate`). This module adds what the configuration cannot hold: the citation of
every paper-given value (:data:`SOURCES`) and the deliberate deviations (:data:`DEVIATIONS`). ``itmatch
recipe MODEL DATASET`` prints :func:`resolve`; ``itmatch recipe --markdown`` prints docs/recipes.md
(:func:`markdown`); a test checks that the committed page is up to date and that every cited key exists.

Source keys are dotted paths into the resolved recipe (``training.lr``, ``model.t2i.agg``). Abbreviations:
SCAN README / train.py / data.py = github.com/kuanghuei/SCAN; PFAN README / run_train.sh =
github.com/HaoYang0123/Position-Focused-Attention-Network; papers = ../shared/papers/*.txt.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from snakemake.utils import validate as snakemake_validate

from itmatch.config import DATASETS, SCHEMA_PATH, has_captions, load_config
from itmatch.models.registry import MODELS
from itmatch.training.settings import recipe, recipe_datasets, variant_spec

CONFIG_PATH = Path("config") / "config.yaml"  # relative to the working directory (the repository root), as Snakemake's
PAPER_DATASETS = ("coco", "f30k")

_SCAN_TRAIN = "SCAN train.py argparse defaults"
_SCAN_F30K = "SCAN README, 'Arguments used to train Flickr30K models' (train.py defaults otherwise)"
_SCAN_COCO = ("SCAN README, 'Arguments used to train MS-COCO models': --num_epochs=20 --lr_update=10 "
              "--learning_rate=.0005")
_PFAN_F30K = ("PFAN run_train.sh line 12 and README 'For Flickr30K': --agg_func=Mean --lambda_softmax=9 (t-i) / "
              "4 (i-t) --num_epochs=30 --lr_update=15 --learning_rate=.0002 --embed_size=1024 --batch_size=128")
_PFAN_COCO = ("PFAN README 'For MS-COCO': --agg_func=Mean --lambda_softmax=9 (t-i) / 4 (i-t) --num_epoches=30 "
              "--lr_update=15 --learning_rate=.0005 --embed_size=1024 --batch_size=128")
_CAAN_COCO = "CAAN §4.2: Adam; MS-COCO 0.0005 for the first 10 epochs, then decayed by 10 times for the next 10"
_CAAN_F30K = "CAAN §4.2: Adam; Flickr30K 0.0002 for the first 15 epochs, reduced to 0.00002 for the next 15"
_SMFEA = ("SMFEA §4.2: ADAM, learning rate 0.0002 with a decay rate of 0.1 every 25 epochs, maximum epoch "
          "number 50, margin 0.2")
_SMFEA_BETA = "SMFEA §4.2 'β_d, β_t, β_c = 0.6, 0.2, 0.2 in Eq.(15) and Eq.(16)'"
_CVSE_F30K = "CVSE (SMFEA §4.2: CAC parameters 'the same with [30]') train_f30k.py argparse default"
_GLFN = "GLFN §4.2: Adam, learning rate 0.0002, gradient clipping 2, 30 epochs, in all experiments"
_BSSAN = "BSSAN §IV-B: SGD, learning rate 0.01, momentum 0.9"

#: model → {"*" (every dataset) | dataset: {dotted key: citation}}
SOURCES: dict[str, dict[str, dict[str, str]]] = {
    "scan": {
        "*": {
            "training.batch_size": _SCAN_TRAIN + " (--batch_size 128)",
            "training.grad_clip": _SCAN_TRAIN + " (--grad_clip 2.)",
            "training.margin": _SCAN_TRAIN + " (--margin 0.2)",
            "training.max_violation": "SCAN README: --max_violation in every recipe",
            "training.optimizer": "SCAN model.py: torch.optim.Adam",
            "training.lr_decay": "SCAN train.py adjust_learning_rate: lr · 0.1^(epoch // lr_update)",
            "model.embed_dim": _SCAN_TRAIN + " (--embed_size 1024)",
            "model.word_dim": _SCAN_TRAIN + " (--word_dim 300)",
            "model.num_layers": _SCAN_TRAIN + " (--num_layers 1, --bi_gru)",
            "model.raw_norm": _SCAN_TRAIN + " (--raw_feature_norm clipped_l2norm)",
            "model.fuse": "SCAN paper §4 (arXiv 1803.08024): t-i + i-t ensembles average two separately "
                          "trained models' similarities",
            "model.tokens.start_end": "SCAN data.py PrecompDataset.__getitem__: <start> + words + <end>",
        },
        "f30k": {
            "training.lr": _SCAN_F30K, "training.epochs": _SCAN_F30K, "training.lr_decay_epochs": _SCAN_F30K,
            "model.t2i.agg": "SCAN paper Table 1, best Flickr30K ensemble 'SCAN t-i AVG + i-t LSE'",
            "model.t2i.lambda_softmax": "SCAN README Flickr30K 't-i AVG': --lambda_softmax=9",
            "model.i2t.agg": "SCAN paper Table 1, best Flickr30K ensemble 'SCAN t-i AVG + i-t LSE'",
            "model.i2t.lambda_softmax": "SCAN README Flickr30K 'i-t LSE': --lambda_softmax=4",
            "model.i2t.lambda_lse": "SCAN README Flickr30K 'i-t LSE': --lambda_lse=5",
        },
        "coco": {
            "training.lr": _SCAN_COCO, "training.epochs": _SCAN_COCO, "training.lr_decay_epochs": _SCAN_COCO,
            "model.t2i.agg": "SCAN paper Table 2, best MS-COCO ensemble 'SCAN t-i LSE + i-t AVG'",
            "model.t2i.lambda_softmax": "SCAN README MS-COCO 't-i LSE': --lambda_softmax=9",
            "model.t2i.lambda_lse": "SCAN README MS-COCO 't-i LSE': --lambda_lse=6",
            "model.i2t.agg": "SCAN paper Table 2, best MS-COCO ensemble 'SCAN t-i LSE + i-t AVG'",
            "model.i2t.lambda_softmax": "SCAN README MS-COCO 'i-t AVG': --lambda_softmax=4",
        },
    },
    "pfan": {
        "*": {
            "training.optimizer": "PFAN §3.1 'Adam optimization algorithm'",
            "training.batch_size": "PFAN §3.1 'The mini-batch size is 128'",
            "training.max_violation": "PFAN README: --max_violation; §2.4 'triplet loss with the hardest negative'",
            "training.grad_clip": "SCAN train.py default --grad_clip 2. (PFAN §3.1: 'the training details are the "
                                  "same as reference [Lee et al., 2018]')",
            "training.margin": "SCAN train.py default --margin 0.2 (PFAN §3.1: 'the training details are the same "
                               "as reference [Lee et al., 2018]')",
            "model.embed_dim": "PFAN §3.1 'joint embedding is fixed as 1024'",
            "model.word_dim": "PFAN §3.1 'embedded into 300-dimensional dense representation'",
            "model.block_dim": "PFAN §3.1 'block index is first embedded into 200-dimensional space'",
            "model.position_norm": "PFAN eq. 8 (renormalised γ)",
            "model.fuse": "PFAN §3.2 'PFAN t-i+i-t fuses the models from PFAN t-i and PFAN i-t'",
            "model.t2i.agg": "PFAN eq. 11 (average over the words) and README t-i --agg_func=Mean",
            "model.t2i.lambda_softmax": "PFAN README t-i --lambda_softmax=9",
            "model.i2t.agg": "PFAN README i-t --agg_func=Mean",
            "model.i2t.lambda_softmax": "PFAN README i-t --lambda_softmax=4",
            "model.tokens.start_end": "PFAN README: built on SCAN's code (its data loader adds <start>/<end>)",
        },
        "f30k": {"training.lr": _PFAN_F30K, "training.epochs": _PFAN_F30K, "training.lr_decay_epochs": _PFAN_F30K},
        "coco": {"training.lr": _PFAN_COCO, "training.epochs": _PFAN_COCO, "training.lr_decay_epochs": _PFAN_COCO},
    },
    "caan": {
        "*": {
            "training.optimizer": "CAAN §4.2 'The Adam optimizer [17] is employed'",
            "training.lr_decay": "CAAN §4.2 'decay it by 10 times'",
            "training.max_violation": "CAAN eq. 19: bi-directional ranking loss with the hardest negatives",
            "model.word_dim": "CAAN §3.2 '300-dimensional vectors'",
            "model.embed_dim": "chosen: §4.4 'ours is only 11 M' parameters (D not stated; caan.py docstring)",
            "model.attn_dim": "chosen: §4.4 'ours is only 11 M' parameters (z not stated; caan.py docstring)",
            "model.inter_attention": "CAAN Table 4, full model (IA)",
            "model.intra_attention": "CAAN Table 4, full model (SA, eq. 16-17)",
        },
        "coco": {"training.lr": _CAAN_COCO, "training.epochs": _CAAN_COCO, "training.lr_decay_epochs": _CAAN_COCO},
        "f30k": {"training.lr": _CAAN_F30K, "training.epochs": _CAAN_F30K, "training.lr_decay_epochs": _CAAN_F30K},
    },
    "smfea": {
        "*": {
            "training.optimizer": _SMFEA, "training.lr": _SMFEA, "training.lr_decay": _SMFEA,
            "training.lr_decay_epochs": _SMFEA, "training.epochs": _SMFEA, "training.margin": _SMFEA,
            "model.embed_dim": "SMFEA §4.2 '2048-dimensional to a 1024-dimensional (D_v = 1024)'",
            "model.word_dim": "SMFEA §4.2 'word embedding space is set to 300'",
            "model.beta_d": _SMFEA_BETA, "model.beta_t": _SMFEA_BETA, "model.beta_c": _SMFEA_BETA,
            "model.concept_dim": _CVSE_F30K + " --input_channel 300 (GloVe 300-d concept vectors)",
            "model.concept_label_ratio": _CVSE_F30K + " --Concept_label_ratio 0.35",
            "model.concept_smooth": "CVSE model_CVSE.py Consensus_level_feature_learning: smooth_coef = 10",
            "model.concept_kl_weight": "CVSE model_CVSE.py forward_loss: weights [3, 5, 1, 2], KL 2 against the "
                                       "fused ranking loss's 3 (1 in SMFEA eq. 20): 2/3",
            "model.concept_train_labels": "CVSE data.py: image-level concept labels for the train split, the "
                                          "caption's own at evaluation",
            "model.train_concept_embeddings": "CVSE data.py: the concept GloVe vectors are inputs, not parameters",
            "model.glove": "CVSE train_f30k.py --inp_name: GloVe vectors of the concepts",
        },
        "coco": {
            "model.concept_label_ratio": "CVSE train_coco.py --Concept_label_ratio 0.4",
        },
    },
    "glfn": {
        "*": {
            "training.optimizer": _GLFN, "training.lr": _GLFN, "training.grad_clip": _GLFN, "training.epochs": _GLFN,
            "training.lr_decay_epochs": "GLFN's SCAN-derived released train script, argparse default --lr_update 15",
            "training.batch_size": "GLFN's SCAN-derived released train script, argparse default --batch_size 128",
            "training.margin": "GLFN's SCAN-derived released train script, argparse default --margin 0.2",
            "training.max_violation": "GLFN eq. 34: hardest negatives in the mini-batch following [57]",
            "model.embed_dim": "GLFN §4.2 'The dimension of the final object vector D is 1024'",
            "model.block_dim": "GLFN §4.2 'D_b is 200'",
            "model.word_dim": "GLFN §4.2 'the length D̄_w^b is 300'",
            "model.alpha": "GLFN §4.2 'The parameter α ... is 0.5' (eq. 33)",
            "model.fuse": "GLFN §4.2: t2i and i2t trained separately, similarity matrices combined linearly",
            "model.lambda_t2i": "PFAN README t-i --lambda_softmax=9 (GLFN builds on PFAN's code)",
            "model.lambda_i2t": "PFAN README i-t --lambda_softmax=4 (GLFN builds on PFAN's code)",
        },
    },
    "bssan": {
        "*": {
            "training.optimizer": _BSSAN, "training.lr": _BSSAN, "training.momentum": _BSSAN,
            "model.word_dim": "BSSAN §IV-B: GloVe '300-dimensional vector'",
            "model.glove": "BSSAN §IV-B: 'pre-trained word embedding built on GloVe [52]'",
            "model.tokens.max_words": "BSSAN §IV-B: 'zero padding ... max length of the text descriptions with 30, "
                                      "and the sequences which are longer than 30 are truncated'",
            "model.lam": "BSSAN §IV-B 'λ and δ are experimentally set with 0.6 and 0.01'",
            "model.delta": "BSSAN §IV-B 'λ and δ are experimentally set with 0.6 and 0.01'",
            "model.num_objects": "BSSAN §IV-B 'the top 10 object proposals'",
            "model.w2r_input": "BSSAN §IV-B 'VGG-19 ... the output of layer conv5_4 is used as the region maps with "
                               "the dimension of 196 × 512' (grid.h5; grid.weights: the ImageNet VGG-19)",
            "model.batch_norm": "BSSAN §IV-B 'tanh activation ... and employ Batch Normalization'",
            "model.w2r_hidden": "BSSAN Table I", "model.w2r_mlp": "BSSAN Table I",
            "model.o2w_hidden": "BSSAN Table I", "model.o2w_mlp": "BSSAN Table I",
        },
    },
}

#: model → deliberate deviations from the paper / release, and why
DEVIATIONS: dict[str, list[str]] = {
    "scan": [
        "Regions are ours (bottom-up-attention extraction or an imported copy), not SCAN's data.zip features.",
        "shapes: demo schedule and sizes (embed 256, word 128, 6 epochs), not a paper setting.",
        "Provenance of the ensemble pairs: the SCAN paper is not in ../shared/papers; the Flickr30K pair 't-i AVG "
        "+ i-t LSE' (67.4 / 48.6 R@1) is named in public summaries of the paper, the MS-COCO pair 't-i LSE + i-t "
        "AVG' (72.7 / 58.8 R@1, 1K) is the Table 2 row whose numbers PFAN Table 2 and SMFEA Table 2 print for "
        "SCAN; re-check both against arXiv 1803.08024 Tables 1-2 when the text is at hand.",
    ],
    "pfan": [
        "COCO follows the released README (30 epochs, decay at 15, lr 5e-4); PFAN §3.1 only says 'the same as "
        "[Lee et al., 2018]', whose COCO schedule is 20 epochs with decay at 10.",
        "position_norm: renorm and max_term: 0 follow the paper (eq. 8, eq. 11); the released code's second "
        "softmax and its 0.5·max term are options (position_norm: softmax, max_term: 0.5).",
        "shapes: demo schedule and sizes.",
    ],
    "caan": [
        "D = 768 and z = 512 are not stated in the paper; they reproduce its stated size of 11 M parameters "
        "(11.2 M with the Flickr30K vocabulary), see the caan.py docstring.",
        "Fragments and v̂, û are l2-normalised (normalize_fragments / normalize_embeddings) so that S suits the "
        "0.2 margin; the paper's margin m is unstated (SCAN's 0.2 is used).",
        "Batch size 128 and gradient clipping 2 are SCAN's (unstated in CAAN).",
        "shapes: 3 epochs at batch 32 (B² pairs per step on a CPU).",
    ],
    "smfea": [
        "CAC branch from CVSE's released code (SMFEA gives no details): concepts from the referral trees' tags and "
        "lemmas (gold / stanza; nltk's WordNet data is not installed), the graph from the train captions "
        "(text.concepts); its loss is CVSE's concept KL only (concept_rank_weight 0: eq. 20 names only the fused "
        "ranking loss). β_c = 0 with β_t = 0.4 is Table 6's [0.6, 0.4, 0.0] ablation.",
        "Concept vectors start random unless models.smfea.glove names a GloVe file (none is downloaded here); "
        "the log says which.",
        "Batch size 128 and gradient clipping 2 are SCAN's (unstated in SMFEA).",
        "shapes: demo schedule and sizes.",
    ],
    "glfn": [
        "The bi-GRU dropout of 0.5 (§4.2) is not applied: on a one-layer GRU PyTorch's dropout has no effect.",
        "lr decay ×0.1 after 15 epochs comes from the SCAN-derived release's --lr_update default; the paper "
        "states no schedule.",
        "shapes: demo schedule and sizes, and a small packaged BERT (text.bert.dataset_model).",
    ],
    "bssan": [
        "W2R attends over the VGG-19 conv5_4 grid as published (torchvision's VGG-19 with the ImageNet weights of "
        "grid.weights, the whole image resized to 224 × 224, conv5_4 after its ReLU; docs/models.md). O2W's objects "
        "are the top 10 by object_conf of our 36 bottom-up-attention regions (Visual Genome, 2048-d), not the "
        "paper's 4096-d fc7 of a Faster R-CNN fine-tuned on PASCAL VOC 2007 + 2012, which we do not have.",
        "GloVe is used when models.bssan.glove names a file; unset (the default, no download here) the word "
        "vectors start random and the log says so.",
        "No gradient clipping and a constant learning rate: the paper states neither ('SGD with an adaptive "
        "learning rate' without details); epochs and batch size are the shared coco / f30k ones (unstated).",
        "The hinge margin M (1.0) is unstated in the paper.",
        "shapes: Adam at the shared demo schedule (tuned on shapes, README 'CAAN and BSSAN'), "
        "uniform_negative_attention: false (eq. 8 collapsed to chance on shapes), and W2R on the regions "
        "(w2r_input: regions; no ImageNet weights offline).",
    ],
}

# keys left out of docs/recipes.md: resources, compute bounds and bookkeeping, not part of the recipe
_DOC_SKIP = {"training.seed", "training.val_every_steps", "training.checkpoint_every_steps", "training.num_workers",
             "training.threads", "training.device", "training.mem_mb", "training.runtime", "model.max_elems",
             "model.pair_chunk", "model.checkpoint"}


def load_recipe_config(config_path: str | Path = CONFIG_PATH, overrides: list[str | Path] = ()) -> dict[str, Any]:
    """The configuration as the Snakefile sees it: our validation, then Snakemake's (which fills the schema's
    defaults)."""
    config = load_config(config_path, list(overrides))
    snakemake_validate(config, str(SCHEMA_PATH), set_default=True)
    return config


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts → {dotted key: leaf value} (lists are leaves)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def sources(model: str, dataset: str) -> dict[str, str]:
    """Citation of every paper- or release-given key of ``model`` on ``dataset`` (none for shapes: a demo)."""
    if dataset not in PAPER_DATASETS:
        return {}
    s = SOURCES.get(model, {})
    return {**s.get("*", {}), **s.get(dataset, {})}


def check_choice(kind: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {kind} {value!r}; valid: {', '.join(valid)}")


def resolve(config: dict[str, Any], model: str, dataset: str, variant: str | None = None) -> dict[str, Any]:
    """``{"training", "model", "sources"}`` of ``model`` on ``dataset``: the train rules' settings plus the
    citations of the paper-given ones. With ``variant`` (config ``variants.<model>.<variant>``): that variant's
    settings, plus ``"variant": {name, description, source, changes}`` (``changes``: every dotted key whose value
    differs from the base model's), and the changed keys cite the variant's source."""
    check_choice("model", model, MODELS)
    check_choice("dataset", dataset, tuple(sorted(d for d in config.get("datasets", {}) if has_captions(config, d))))
    spec = variant_spec(config, model, variant)
    out: dict[str, Any] = copy.deepcopy(recipe(config, model, dataset, variant))
    out["sources"] = sources(model, recipe_datasets(config, dataset)[0])
    if variant:
        base = flatten(recipe(config, model, dataset))
        changes = {k: v for k, v in flatten({"training": out["training"], "model": out["model"]}).items()
                   if base.get(k, None) != v or k not in base}
        cite = f"variant {variant}: {spec.get('source') or 'no source given'}"
        out["sources"] = {**{k: v for k, v in out["sources"].items() if k not in changes},
                          **dict.fromkeys(changes, cite)}
        out["variant"] = {"name": variant, "description": spec.get("description"), "source": spec.get("source"),
                          "changes": changes}
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, float):
        return f"{v:g}"
    return json.dumps(v) if not isinstance(v, str) else v


def _md(text: str) -> str:
    """Plain text safe in a Markdown table cell (no HTML tags, no column breaks)."""
    return text.replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def markdown(config: dict[str, Any]) -> str:
    """docs/recipes.md: per model, every recipe key with its coco / f30k / shapes value and its source."""
    lines = ["# Training recipes of every model", "",
             "Generated by `itmatch recipe --markdown > docs/recipes.md` from `config/config.yaml` (through the "
             "same resolution the train rules use) and the citations in `itmatch/recipes.py`; "
             "`tests/test_recipes.py` checks that this page is up to date. `itmatch recipe MODEL DATASET` prints one "
             "recipe as JSON. Sources: papers in `../shared/papers/`; SCAN README / train.py / data.py = "
             "github.com/kuanghuei/SCAN; PFAN README / run_train.sh = "
             "github.com/HaoYang0123/Position-Focused-Attention-Network. The `shapes` column is the CPU demo, "
             "not a paper setting. Resource keys (threads, memory, device, chunk sizes) are left out.", ""]
    for model in MODELS:
        rec = {d: resolve(config, model, d) for d in DATASETS if d in config["datasets"]}
        flat = {d: flatten({"training": r["training"], "model": r["model"]}) for d, r in rec.items()}
        keys = [k for k in dict.fromkeys(k for f in flat.values() for k in f) if k not in _DOC_SKIP]
        cols = [d for d in ("coco", "f30k", "shapes") if d in rec]
        lines += [f"## {model}", "", "| key | " + " | ".join(cols) + " | source (coco / f30k) |",
                  "|---|" + "---|" * len(cols) + "---|"]
        for k in keys:
            vals = [_fmt(flat[d].get(k, "—")) for d in cols]
            src = {d: rec[d]["sources"].get(k) for d in PAPER_DATASETS if d in rec}
            uniq = list(dict.fromkeys(v for v in src.values() if v))
            if len(uniq) == 1 and all(src.values()):
                text = uniq[0]
            elif uniq:
                text = "; ".join(f"{d}: {v or 'unstated'}" for d, v in src.items())
            else:
                text = "unstated (config default)"
            cells = [f"`{k}`", *(f"`{v}`" for v in vals), _md(text)]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Deliberate deviations:", ""] + [f"- {_md(d)}" for d in DEVIATIONS.get(model, [])] + [""]
        lines += _variant_lines(config, model)
    return "\n".join(lines)


def _variant_lines(config: dict[str, Any], model: str) -> list[str]:
    """docs/recipes.md: the model's ablation variants (config ``variants``) with what they change and their source."""
    variants = (config.get("variants") or {}).get(model) or {}
    if not variants:
        return []
    dataset = next(d for d in (*PAPER_DATASETS, *DATASETS) if d in config["datasets"])
    lines = [f"Ablation variants (`results/{model}/{{dataset}}/{{variant}}/metrics.json`):", ""]
    for name, spec in variants.items():
        changes = resolve(config, model, dataset, name)["variant"]["changes"]
        what = ", ".join(f"`{k}` = `{_fmt(v)}`" for k, v in changes.items()) or "nothing (same as the base)"
        about = f" ({_md(spec['description'])})" if spec.get("description") else ""
        source = f" Source: {_md(spec['source'])}." if spec.get("source") else ""
        lines.append(f"- `{name}`{about}: {what}.{source}")
    return [*lines, ""]
