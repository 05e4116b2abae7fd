"""Released SCAN / PFAN checkpoints (``model_best.pth.tar``) → our checkpoint (``model.pt``) + settings.

The released layout (kuanghuei/SCAN ``train.py`` lines 145–151; PFAN's ``train_attention.py`` lines 144–150
writes the same): ``{"epoch", "model": [image-encoder state, text-encoder state], "best_rsum", "opt", "Eiters"}``
with ``opt`` the ``argparse.Namespace`` of the training arguments. It is read with
``torch.load(weights_only=True)`` allowing that one class, so a crafted file still cannot run code. One file is
one direction (``opt.cross_attn``); SCAN's and PFAN's "t-i + i-t" results average a t2i and an i2t model, so
several files import as the parts of one fused checkpoint.

Mapping (their key → ours; ``model.py`` of kuanghuei/SCAN, ``model_attention.py`` of
HaoYang0123/Position-Focused-Attention-Network @ 3e6a304):

- image encoder ``fc.weight`` / ``fc.bias`` → ``img_enc.fc.*`` (``precomp_enc_type weight_norm``: ``fc.weight_g``,
  ``fc.weight_v`` folded into one weight, g · v / ‖v‖ over the whole matrix as ``weight_norm(dim=None)``);
- PFAN's ``fc_att.weight`` [ι, D] → ``position.M`` = its transpose, ``fc_att.bias`` → ``position.bias``,
  ``position_embedding.weight`` [K² + 1, ι] → ``position.embed.weight`` (K and ι from its shape);
- text encoder ``embed.weight``, ``rnn.*`` → ``txt_enc.embed.weight``, ``txt_enc.rnn.*`` (same GRU names).

Settings (``opt`` → ours): ``embed_size`` → ``embed_dim``, ``word_dim``, ``num_layers``, ``cross_attn`` →
``direction``, ``lambda_softmax`` / ``agg_func`` / ``lambda_lse`` → the direction's attention block,
``raw_feature_norm`` clipped_l2norm | no_norm → ``raw_norm`` clipped_l2norm | none; ``tokens.start_end`` true (their
data loaders wrap captions in ``<start>``/``<end>``). PFAN adds its released-code variants: ``position_norm:
softmax``, ``position_bias: true``, ``max_term: 0.5`` in t2i (:mod:`itmatch.models.pfan`). What our classes do not
implement is refused with the option named: ``bi_gru`` false, ``no_imgnorm`` / ``no_txtnorm`` true, other
``raw_feature_norm`` values.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from itmatch.models.attention import AGGS
from itmatch.models.checkpoint import write_checkpoint
from itmatch.models.registry import build_model

KINDS = ("scan", "pfan")
RAW_NORMS = {"clipped_l2norm": "clipped_l2norm", "no_norm": "none"}


class ReleasedCheckpointError(ValueError):
    """A released checkpoint that cannot be imported (message names the file and the key or option)."""


def read_released(path: str | Path) -> dict[str, Any]:
    """The released checkpoint dict, read without running code (``argparse.Namespace`` allowed for ``opt``)."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ck = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 (pickle / zip errors of many kinds: name the file)
        raise ReleasedCheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ck, dict) or "model" not in ck or "opt" not in ck:
        keys = sorted(ck) if isinstance(ck, dict) else type(ck).__name__
        raise ReleasedCheckpointError(f"{path}: not a SCAN/PFAN checkpoint: expected keys 'model' and 'opt', "
                                      f"found {keys}")
    model = ck["model"]
    if not (isinstance(model, (list, tuple)) and len(model) == 2 and all(isinstance(m, dict) for m in model)):
        raise ReleasedCheckpointError(f"{path}: 'model' must be [image-encoder state, text-encoder state]")
    return ck


def _opt(ck: dict[str, Any], path: str | Path) -> dict[str, Any]:
    opt = ck["opt"]
    opt = vars(opt) if isinstance(opt, argparse.Namespace) else opt
    if not isinstance(opt, dict):
        raise ReleasedCheckpointError(f"{path}: 'opt' is a {type(opt).__name__}, expected the training arguments")
    return opt


def _need(opt: dict[str, Any], key: str, path: str | Path) -> Any:
    if key not in opt:
        raise ReleasedCheckpointError(f"{path}: opt has no {key!r} (a SCAN/PFAN training argument)")
    return opt[key]


def _check_keys(state: dict[str, Any], expected: list[str], what: str, path: str | Path) -> None:
    """Missing or unexpected keys → an error naming the first ones (in the file's order)."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''} ({len(missing)})")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}{' …' if len(unexpected) > 3 else ''} "
                         f"({len(unexpected)})")
        raise ReleasedCheckpointError(f"{path}: {what} state: {'; '.join(parts)}")


def _gru_keys(num_layers: int) -> list[str]:
    return [f"rnn.{w}_{t}_l{layer}{sfx}" for layer in range(num_layers) for sfx in ("", "_reverse")
            for w in ("weight", "bias") for t in ("ih", "hh")]


def _settings(kind: str, opt: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """Our model settings of one released direction."""
    direction = _need(opt, "cross_attn", path)
    if direction not in ("t2i", "i2t"):
        raise ReleasedCheckpointError(f"{path}: opt.cross_attn = {direction!r}, expected t2i or i2t")
    if not opt.get("bi_gru", False):
        raise ReleasedCheckpointError(f"{path}: opt.bi_gru is false: a one-direction GRU is not implemented "
                                      "(the released models use --bi_gru)")
    for flag in ("no_imgnorm", "no_txtnorm"):
        if opt.get(flag, False):
            raise ReleasedCheckpointError(f"{path}: opt.{flag} is true: not implemented (embeddings are l2-normalised)")
    raw = opt.get("raw_feature_norm", "clipped_l2norm")
    if raw not in RAW_NORMS:
        raise ReleasedCheckpointError(f"{path}: opt.raw_feature_norm = {raw!r}: only {', '.join(RAW_NORMS)} are "
                                      "implemented")
    agg = _need(opt, "agg_func", path)
    if agg not in AGGS:
        raise ReleasedCheckpointError(f"{path}: opt.agg_func = {agg!r}, expected one of {', '.join(AGGS)}")
    cfg: dict[str, Any] = {
        "embed_dim": int(_need(opt, "embed_size", path)), "word_dim": int(_need(opt, "word_dim", path)),
        "num_layers": int(opt.get("num_layers", 1)), "raw_norm": RAW_NORMS[raw], "direction": direction,
        direction: {"lambda_softmax": float(_need(opt, "lambda_softmax", path)), "agg": agg,
                    "lambda_lse": float(opt.get("lambda_lse", 6.0))},
        "tokens": {"start_end": True, "max_words": None},
    }
    if kind == "pfan":
        cfg.update({"position_norm": "softmax", "position_bias": True, "max_term": 0.5 if direction == "t2i" else 0.0})
    return cfg


def convert(kind: str, path: str | Path) -> dict[str, Any]:
    """One released file → our checkpoint part ``{name, config, data_info, state_dict, epoch, step, val_rsum,
    source}`` (the model built from it accepts the state, strictly)."""
    if kind not in KINDS:
        raise ReleasedCheckpointError(f"unknown released model {kind!r}; known: {', '.join(KINDS)}")
    ck = read_released(path)
    opt = _opt(ck, path)
    cfg = _settings(kind, opt, path)
    img, txt = (dict(s) for s in ck["model"])
    enc = opt.get("precomp_enc_type", "basic")
    if enc not in ("basic", "weight_norm") or (kind == "pfan" and enc != "basic"):
        raise ReleasedCheckpointError(f"{path}: opt.precomp_enc_type = {enc!r} is not implemented for {kind}")
    fc = ["fc.weight_g", "fc.weight_v", "fc.bias"] if enc == "weight_norm" else ["fc.weight", "fc.bias"]
    img_keys = fc + (["fc_att.weight", "fc_att.bias", "position_embedding.weight"] if kind == "pfan" else [])
    _check_keys(img, img_keys, "image-encoder", path)
    _check_keys(txt, ["embed.weight", *_gru_keys(cfg["num_layers"])], "text-encoder", path)
    if enc == "weight_norm":  # torch weight_norm(dim=None): w = g · v / ‖v‖ (norm over the whole matrix)
        v = img.pop("fc.weight_v")
        img["fc.weight"] = img.pop("fc.weight_g") * v / v.norm()
    state = {"img_enc.fc.weight": img["fc.weight"], "img_enc.fc.bias": img["fc.bias"],
             "txt_enc.embed.weight": txt["embed.weight"],
             **{f"txt_enc.{k}": v for k, v in txt.items() if k.startswith("rnn.")}}
    vocab_size = int(txt["embed.weight"].shape[0])
    data_info: dict[str, Any] = {"vocab_size": vocab_size}
    if kind == "pfan":
        emb = img["position_embedding.weight"]
        K = round((emb.shape[0] - 1) ** 0.5)
        if K * K + 1 != emb.shape[0]:
            raise ReleasedCheckpointError(f"{path}: position_embedding.weight has {emb.shape[0]} rows, not K²+1")
        cfg["block_dim"] = int(emb.shape[1])
        data_info["blocks_K"] = K
        data_info["feature_dim"] = int(img["fc_att.weight"].shape[1])
        state.update({"position.M": img["fc_att.weight"].t().contiguous(), "position.bias": img["fc_att.bias"],
                      "position.embed.weight": emb})
    else:
        data_info["feature_dim"] = int(img["fc.weight"].shape[1])
    if "img_dim" in opt and int(opt["img_dim"]) != data_info["feature_dim"]:
        raise ReleasedCheckpointError(f"{path}: opt.img_dim = {opt['img_dim']} but the image encoder reads "
                                      f"{data_info['feature_dim']}-d features")
    if "vocab_size" in opt and int(opt["vocab_size"]) != vocab_size:
        raise ReleasedCheckpointError(f"{path}: opt.vocab_size = {opt['vocab_size']} but embed.weight has "
                                      f"{vocab_size} rows")
    model = build_model(kind, cfg, data_info)
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as e:  # shapes that disagree with the settings (e.g. embed_size vs fc rows)
        raise ReleasedCheckpointError(f"{path}: the weights do not fit the settings in opt: {e}") from e
    return {"name": cfg["direction"], "config": cfg, "data_info": data_info, "state_dict": model.state_dict(),
            "epoch": int(ck.get("epoch", -1)), "step": int(ck.get("Eiters", -1)),
            "val_rsum": float(ck.get("best_rsum", float("nan"))),
            "source": {"file": str(path), "kind": kind,
                       "opt": {k: v for k, v in opt.items() if isinstance(v, (str, int, float, bool, type(None)))}}}


def import_released(kind: str, paths: list[str | Path], out_model: str | Path,
                    parts: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Released file(s) of one model → ``out_model`` (one part per file, each a distinct direction); returns
    the parts (without their state) for the settings record. ``parts``: already converted."""
    parts = parts if parts is not None else [convert(kind, p) for p in paths]
    check_parts(parts)
    write_checkpoint(out_model, kind, parts)
    return [{k: v for k, v in p.items() if k != "state_dict"} for p in parts]


def check_parts(parts: list[dict[str, Any]]) -> None:
    """The files of one import: distinct directions, one vocabulary size and feature dim."""
    dirs = [p["name"] for p in parts]
    if len(set(dirs)) != len(dirs):
        raise ReleasedCheckpointError(f"two files of the same direction {dirs}: give one t2i and/or one i2t model")
    infos = {(p["data_info"]["vocab_size"], p["data_info"]["feature_dim"]) for p in parts}
    if len(infos) != 1:
        raise ReleasedCheckpointError(f"the files disagree on (vocabulary size, feature dim): {sorted(infos)}")


def fused_settings(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The workflow's settings of the imported model (``models.<model>`` layout): the parts' shared keys, each
    direction's attention block and ``fuse`` = the imported directions."""
    cfg = {k: v for k, v in parts[0]["config"].items() if k not in ("direction", "t2i", "i2t", "max_term")}
    for p in parts:
        cfg[p["name"]] = p["config"][p["name"]]
        if "max_term" in p["config"] and p["name"] == "t2i":
            cfg["max_term"] = p["config"]["max_term"]
    cfg["fuse"] = [p["name"] for p in parts]
    return cfg


def import_run(kind: str, paths: list[str | Path], dataset: str, out: str | Path,
               vocab_json: str | Path | None = None) -> dict[str, Any]:
    """``itmatch import-checkpoint``: released file(s) → ``out/model.pt`` + ``out/import.json`` (model, dataset,
    settings, sources). ``vocab_json``: the dataset's vocab.json, when built, to check the vocabulary size."""
    import hashlib
    import json

    from itmatch.utils.io import write_json

    out = Path(out)
    parts = [convert(kind, p) for p in paths]
    check_parts(parts)
    if vocab_json is not None and Path(vocab_json).exists():
        with open(vocab_json, encoding="utf-8") as fh:
            n_words = len(json.load(fh)["idx2word"])
        if n_words != parts[0]["data_info"]["vocab_size"]:
            raise ReleasedCheckpointError(
                f"{paths[0]}: {parts[0]['data_info']['vocab_size']} word embeddings, but dataset {dataset!r} has "
                f"{n_words} words in {vocab_json}: give the dataset the model's vocabulary (datasets.{dataset}.vocab)")
    out.mkdir(parents=True, exist_ok=True)
    info = import_released(kind, paths, out / "model.pt", parts=parts)
    record = {"model": kind, "dataset": dataset, "settings": fused_settings(info),
              "files": [{"path": str(p), "sha256": hashlib.sha256(Path(p).read_bytes()).hexdigest()} for p in paths],
              "parts": info}
    write_json(out / "import.json", record)
    return record
