"""The training loop shared by every model (VSE++/SCAN recipe), with exact resume.

Adam; step-decay learning rate ``lr · lr_decay^(epoch // lr_decay_epochs)``; gradient norm clipped at
``grad_clip``; loss = the model's ``loss`` (default: hardest-negative bidirectional triplet loss, margin
``margin``; the first ``warmup_epochs`` epochs sum over all negatives instead); validation (rSum on up to
``val_max_images`` images of the val split) after every epoch and
every ``val_every_steps`` steps; the best model by val rSum is kept; one ``train_log.csv`` row per
validation (epoch, step, loss, val R@K both ways, rSum, lr, seconds), and TensorBoard events in the same
folder (:mod:`itmatch.training.board`).

Resume: the complete state — model, optimizer, epoch, position in the epoch's batch order (a permutation
from seed and epoch), best model and rSum, log rows, running loss, RNG states — is saved atomically to
``state_path`` every ``checkpoint_every_steps`` steps, after each validation and on SIGTERM. A killed job
(SIGTERM or SIGKILL at any moment) started again continues from the last saved state and, on CPU with the
same seed and thread count, ends with exactly the same model as an uninterrupted run. A state older than
the inputs, or written with other settings, is ignored (logged). The state is deleted on success
(:class:`itmatch.utils.resume.TensorState`). States and checkpoints hold tensors and plain values only and
are read with ``torch.load(weights_only=True)``.

Divergence: a non-finite loss or gradient norm stops training with :class:`TrainingDiverged` (the step is
not applied; ``nonfinite_patience`` > 0 skips that many consecutive such steps first), as does a validation
whose similarity matrix is not finite; ``model.pt`` and the log are then not written, so the rule fails.
Under bf16 / fp16 an overflow is not a divergence: a non-finite loss whose batch gives a finite loss in fp32
(:func:`fp32_loss`), or (fp16) non-finite scaled gradients, skip the step — with fp16 through GradScaler, which
skips it and lowers its scale — and only more than :data:`MAX_OVERFLOW_STEPS` consecutive overflows stop
training; a loss that is non-finite in fp32 as well is a divergence as above.
"""

from __future__ import annotations

import contextlib
import csv
import math
import random
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from itmatch.config import schema_defaults
from itmatch.corpus.data import BatchList, Corpus, PairDataset, collate_pairs, epoch_batches, loader
from itmatch.evaluation.evaluate import NonFiniteSimilarityError, check_finite_similarity, similarity, split_rows
from itmatch.evaluation.metrics import retrieval_metrics
from itmatch.models.checkpoint import read_checkpoint, write_checkpoint
from itmatch.models.registry import build_model
from itmatch.training.board import TrainingBoard
from itmatch.training.loss import ContrastiveLoss
from itmatch.utils.device import autocast, resolve_device, resolve_precision, to_device
from itmatch.utils.io import atomic_path
from itmatch.utils.logs import log, progress
from itmatch.utils.resume import TensorState, fingerprint, sigterm_flag

LOG_COLUMNS = ["epoch", "step", "loss", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "lr",
               "seconds"]

# keys that do not change the trajectory of the steps already taken: a saved state stays valid when they change
# (e.g. more epochs continue a finished-early run's state)
RESOURCE_KEYS = ("num_workers", "threads", "mem_mb", "runtime", "device", "epochs", "checkpoint_every_steps",
                 "precision")  # (the resolved precision joins the state's key when it is not fp32)


class TrainingDiverged(FloatingPointError):
    """A non-finite loss, gradient norm or validation similarity: training stopped, nothing written."""


# Consecutive bf16 / fp16 overflow steps (skipped) before training stops: GradScaler starts at 2**16 and halves
# its scale on each overflow, so after 40 it is 2**-24, fp16's smallest subnormal; an overflow that outlasts that
# is not one the scale can fix (a forward pass that overflows whatever the scale, or a diverging model).
MAX_OVERFLOW_STEPS = 40


def fp32_loss(model: torch.nn.Module, images: dict[str, torch.Tensor], captions: dict[str, torch.Tensor],
              crit: ContrastiveLoss, device: torch.device) -> float:
    """The batch's loss in fp32 (no autocast, no gradients; RNG and buffers such as BatchNorm statistics left as
    they were): tells a reduced-precision overflow from a divergence."""
    saved = {k: v.detach().clone() for k, v in model.named_buffers()}
    with torch.no_grad(), torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        loss, _ = model.loss(to_device(images, device), to_device(captions, device), crit)
    for k, v in model.named_buffers():
        v.copy_(saved[k])
    return float(loss)


def make_optimizer(params: list[torch.nn.Parameter], t: dict[str, Any]) -> torch.optim.Optimizer:
    if t["optimizer"] == "adam":
        return torch.optim.Adam(params, lr=float(t["lr"]), weight_decay=float(t["weight_decay"]))
    if t["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=float(t["lr"]), momentum=float(t["momentum"]),
                               weight_decay=float(t["weight_decay"]))
    raise ValueError(f"training.optimizer must be 'adam' or 'sgd', got {t['optimizer']!r}")


def write_log(path: str | Path, rows: list[dict[str, Any]], extra: list[str] | None = None) -> None:
    cols = (extra or []) + LOG_COLUMNS
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in cols})


def _rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain values (numpy's key array as an int64 tensor: loadable weights-only)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": random.getstate()}


def _set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(s["python"])


def validate(model, corpus: Corpus, max_images: int, num_workers: int = 0, precision: str = "fp32"
             ) -> dict[str, Any]:
    image_rows, caption_rows, cap_image = split_rows(corpus, "val", max_images)
    sim = similarity(model, corpus, image_rows, caption_rows, num_workers=num_workers, desc="val",
                     precision=precision)
    check_finite_similarity(sim, "validation")
    return retrieval_metrics(sim, cap_image)


def train_model(model_name: str, model_cfg: dict[str, Any], tcfg: dict[str, Any], corpus: Corpus,
                out_model: str | Path, out_log: str | Path, state_path: str | Path,
                input_files: list[str] | None = None, part: str = "",
                stop_after_steps: int | None = None) -> dict[str, Any]:
    """Train one model (one part of a fused model), write its checkpoint and log; returns the best part."""
    t = {**schema_defaults("training"), **tcfg}  # the schema is the one home of the defaults
    if int(t["epochs"]) < 1:
        raise ValueError(f"training.epochs must be at least 1, got {t['epochs']}")
    state_path = Path(state_path)
    torch.set_num_threads(int(t["threads"]))
    data_info = dict(corpus.info)
    key = fingerprint([model_name, model_cfg, {k: v for k, v in t.items() if k not in RESOURCE_KEYS}, data_info,
                       part])
    device = resolve_device(str(t["device"]), "training.device")
    precision = resolve_precision(str(t["precision"]), device, "training.precision")
    log.info("training precision %s%s", precision, " (fp16 with a gradient scaler)" if precision == "fp16" else "")
    if precision != "fp32":
        key += f"-{precision}"
    torch.manual_seed(int(t["seed"]))
    np.random.seed(int(t["seed"]) % 2 ** 32)
    random.seed(int(t["seed"]))
    model = build_model(model_name, model_cfg, data_info).to(device)
    model.prepare_training(corpus)  # pretrained initialisation (e.g. BSSAN GloVe); a resumed state overwrites it
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, t)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    criterion = ContrastiveLoss(margin=float(t["margin"]), max_violation=bool(t["max_violation"]))
    # warm-up: sum over all negatives for the first epochs (hardest negatives from a random start can collapse)
    warmup = ContrastiveLoss(margin=float(t["margin"]), max_violation=False)
    train_rows = corpus.rows("train", "captions")
    dataset = PairDataset(corpus, train_rows)
    st: dict[str, Any] = {"epoch": 0, "batch": 0, "step": 0, "best_rsum": -1.0, "best": None, "best_at": None,
                          "rows": [], "loss_sum": 0.0, "loss_n": 0, "seconds": 0.0, "nonfinite": 0, "overflow": 0}
    who = f"{model_name}{'/' + part if part else ''}"
    state = TensorState(state_path, key, f"training {who}")
    saved = state.load(device, input_files or [])
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        if "scaler" in saved:
            scaler.load_state_dict(saved["scaler"])
        _set_rng_state(saved["rng"])
        st = {"nonfinite": 0, "overflow": 0, **saved["loop"]}
        log.info("resuming from %s: epoch %d, batch %d, step %d", state_path, st["epoch"], st["batch"], st["step"])
    t_start = time.time() - st["seconds"]

    def save_state() -> None:
        st["seconds"] = time.time() - t_start
        state.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": _rng_state(), "loop": st,
                    **({"scaler": scaler.state_dict()} if scaler.is_enabled() else {})})

    def lr_at(epoch: int) -> float:
        return float(t["lr"]) * float(t["lr_decay"]) ** (epoch // max(1, int(t["lr_decay_epochs"])))

    patience = int(t["nonfinite_patience"])

    def diverged(what: str, value: float, epoch: int) -> TrainingDiverged:
        return TrainingDiverged(
            f"{who}: training diverged: non-finite {what} ({value}) at epoch {epoch}, step {st['step'] + 1}, "
            f"{st['nonfinite']} consecutive non-finite step(s) (training.nonfinite_patience = {patience}); no "
            f"model is written. Lower training.lr (now {t['lr']}), set training.grad_clip > 0 (now "
            f"{t['grad_clip']}), or check the input features for NaN/inf.")

    def do_validation(epoch: int) -> None:
        try:
            m = validate(model, corpus, int(t["val_max_images"]), int(t["num_workers"]), precision)
        except NonFiniteSimilarityError as e:
            raise TrainingDiverged(f"{who}: training diverged at epoch {epoch}, step {st['step']}: {e}; no model "
                                   f"is written. Lower training.lr or set training.grad_clip > 0.") from None
        row = {"epoch": epoch, "step": st["step"], "loss": st["loss_sum"] / max(1, st["loss_n"]),
               **{f"{d}_r{k}": m[d][f"r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)},
               "rsum": m["rsum"], "lr": lr_at(epoch), "seconds": round(time.time() - t_start, 2)}
        st["rows"].append(row)
        board.validation(row)
        st["loss_sum"], st["loss_n"] = 0.0, 0
        log.info("%s%s epoch %d step %d: loss %.4f val rSum %.2f (i2t R@1 %.1f, t2i R@1 %.1f)", model_name,
                 f"/{part}" if part else "", epoch, st["step"], row["loss"], m["rsum"], m["i2t"]["r1"],
                 m["t2i"]["r1"])
        if m["rsum"] > st["best_rsum"]:  # finite: validate raised on a non-finite similarity
            st["best_rsum"] = m["rsum"]
            st["best"] = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            st["best_at"] = {"epoch": epoch, "step": st["step"]}
        model.train()

    # One loader for the whole run (persistent workers, pinned memory on CUDA); each epoch sets its batches.
    sampler = BatchList()
    # On CUDA the features cross as stored (float16) and are cast on the GPU (to_device).
    cuda = device.type == "cuda"
    train_loader = loader(dataset, sampler, num_workers=int(t["num_workers"]),
                          collate=partial(collate_pairs, float16=True) if cuda else collate_pairs,
                          pin_memory=cuda, persistent=True)
    epochs = int(t["epochs"])
    every_ckpt = int(t["checkpoint_every_steps"])
    every_val = int(t["val_every_steps"])
    board = TrainingBoard(Path(out_log).parent, st["step"])  # TensorBoard events beside the CSV
    with sigterm_flag() as terminated, contextlib.closing(board):  # SIGTERM: finish the current step, save, exit
        while st["epoch"] < epochs:
            epoch = st["epoch"]
            for g in opt.param_groups:
                g["lr"] = lr_at(epoch)
            batches = epoch_batches(len(dataset), int(t["batch_size"]), int(t["seed"]), epoch)
            if int(t["max_steps_per_epoch"]):  # a capped epoch (smoke runs, the scale rehearsal)
                batches = batches[:int(t["max_steps_per_epoch"])]
            model.train()
            if st["batch"] < len(batches):
                rest = batches[st["batch"]:]
                sampler.set_batches(rest)
                for images, captions in progress(train_loader, desc=f"{part or model_name} epoch {epoch}",
                                                 total=len(rest), unit="batch"):
                    crit = warmup if epoch < int(t["warmup_epochs"]) else criterion
                    with autocast(device, precision):
                        loss, _ = model.loss(to_device(images, device), to_device(captions, device), crit)
                    opt.zero_grad(set_to_none=True)
                    loss_value = float(loss.detach())
                    bad = None
                    # under bf16 / fp16 a non-finite loss whose batch gives a finite loss in fp32 is an overflow
                    overflow = (not math.isfinite(loss_value) and precision != "fp32"
                                and math.isfinite(fp32_loss(model, images, captions, crit, device)))
                    if not math.isfinite(loss_value) and not overflow:
                        bad = ("loss", loss_value)
                    elif not overflow or scaler.is_enabled():
                        # fp16: an overflow gives inf/nan gradients; the scaler skips the step and lowers its scale
                        scaler.scale(loss).backward()
                        scaler.unscale_(opt)  # a no-op unless fp16
                        if float(t["grad_clip"]) > 0:
                            norm = torch.nn.utils.clip_grad_norm_(params, float(t["grad_clip"]))
                        else:
                            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
                        if not math.isfinite(float(norm)):
                            if scaler.is_enabled():
                                overflow = True
                            else:
                                bad = ("gradient norm", float(norm))
                    if bad is None and not overflow:
                        scaler.step(opt)
                        scaler.update()
                        st["nonfinite"] = st["overflow"] = 0
                        st["loss_sum"] += loss_value
                        st["loss_n"] += 1
                    elif bad is None:  # an overflow: the step is not applied (fp16: GradScaler skips it)
                        if scaler.is_enabled():
                            scaler.step(opt)
                            scaler.update()
                        opt.zero_grad(set_to_none=True)
                        st["overflow"] = st.get("overflow", 0) + 1
                        if st["overflow"] > MAX_OVERFLOW_STEPS:
                            raise TrainingDiverged(
                                f"{who}: {st['overflow']} consecutive steps overflowed under {precision} (last at "
                                f"epoch {epoch}, step {st['step'] + 1}; their losses are finite in fp32); no model is "
                                f"written. Train with training.precision: bf16 or fp32, or lower training.lr.")
                        log.info("%s: %s overflow at epoch %d step %d (loss %s, finite in fp32): step skipped%s",
                                 who, precision, epoch, st["step"] + 1, loss_value,
                                 f", loss scale now {scaler.get_scale():g}" if scaler.is_enabled() else "")
                    else:  # the step is not applied
                        opt.zero_grad(set_to_none=True)
                        st["nonfinite"] += 1
                        if st["nonfinite"] > patience:
                            raise diverged(bad[0], bad[1], epoch)
                        log.warning("%s: non-finite %s (%s) at epoch %d step %d: step skipped (%d of %d allowed)",
                                    who, bad[0], bad[1], epoch, st["step"] + 1, st["nonfinite"], patience)
                    st["batch"] += 1
                    st["step"] += 1
                    board.step(st["step"], loss_value, opt.param_groups[0]["lr"])
                    if every_val and st["step"] % every_val == 0 and st["batch"] < len(batches):
                        do_validation(epoch)
                        save_state()
                    elif every_ckpt and st["step"] % every_ckpt == 0:
                        save_state()
                    if terminated() or (stop_after_steps is not None and st["step"] >= stop_after_steps):
                        save_state()
                        raise SystemExit(f"stopped at step {st['step']} (state saved to {state_path})")
            do_validation(epoch)
            st["epoch"] += 1
            st["batch"] = 0
            save_state()

    # (every epoch ends with a validation, whose rSum is finite and >= 0 > the initial best_rsum, and epochs >= 1:
    # st["best"] is set here)
    best = {"name": part, "config": model_cfg, "data_info": data_info, "state_dict": st["best"],
            "epoch": st["best_at"]["epoch"], "step": st["best_at"]["step"], "val_rsum": st["best_rsum"],
            "train_seconds": round(time.time() - t_start, 2)}
    write_checkpoint(out_model, model_name, [best])
    write_log(out_log, st["rows"])
    state.discard()
    log.info("best val rSum %.2f at epoch %d step %d; %.0f s", st["best_rsum"], best["epoch"], best["step"],
             best["train_seconds"])
    return best


def fuse_checkpoints(model_name: str, part_models: list[str], part_logs: list[str], parts: list[str],
                     out_model: str | Path, out_log: str | Path) -> None:
    """Separately trained directions → one checkpoint with several parts (averaged at evaluation) and one
    log with a ``part`` column."""
    all_parts, rows = [], []
    for name, mp, lp in zip(parts, part_models, part_logs, strict=True):
        ck = read_checkpoint(mp)
        for p in ck["parts"]:
            p["name"] = name
            all_parts.append(p)
        with open(lp, encoding="utf-8") as fh:
            rows += [{"part": name, **r} for r in csv.DictReader(fh)]
    write_checkpoint(out_model, model_name, all_parts)
    write_log(out_log, rows, extra=["part"])
