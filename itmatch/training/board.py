"""Live training view: TensorBoard event files in each run folder, beside ``train_log.csv``.

Written with ``torch.utils.tensorboard.SummaryWriter`` (the ``tensorboard`` package's event format); watch a
run with ``tensorboard --logdir results/``. Scalars (x axis = optimizer step):

- every step: ``train/loss`` (the step's loss), ``train/lr`` (learning rate), ``train/step_seconds`` (wall time
  since the previous step: data loading, forward, backward, update; time spent in validation is not counted);
- every validation: ``val/i2t_r1`` … ``val/t2i_r10`` and ``val/rsum`` (as the CSV rows).

Resume: a run that continues from a state saved after step k opens its writer with ``purge_step`` = k + 1, so
TensorBoard drops the earlier process's events past step k (they are computed again). A run that starts
from scratch removes the folder's earlier event files first, so one folder shows one training. The event
files are a view, not an artifact: no rule reads them, and they are flushed every few seconds, so a killed
job's last few seconds may be missing from them (never from the CSV or the checkpoint).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from itmatch.utils.logs import log

EVENT_GLOB = "events.out.tfevents.*"
VAL_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
FLUSH_SECONDS = 10


class TrainingBoard:
    """The TensorBoard writer of one run folder (``folder``), starting at optimizer step ``start_step``."""

    def __init__(self, folder: str | Path, start_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when training

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if start_step == 0:
            for old in folder.glob(EVENT_GLOB):
                old.unlink()
        # a state saved after step k: the earlier process's events past k are superseded
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=start_step + 1 if start_step else None,
                                    flush_secs=FLUSH_SECONDS)
        self.folder = folder
        self._last = time.perf_counter()
        log.info("TensorBoard events → %s (tensorboard --logdir %s)", folder, folder)

    def step(self, step: int, loss: float, lr: float) -> None:
        """After optimizer step ``step`` (1-based count of steps taken)."""
        now = time.perf_counter()
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/lr", lr, step)
        self.writer.add_scalar("train/step_seconds", now - self._last, step)
        self._last = now

    def validation(self, row: dict[str, Any]) -> None:
        """One ``train_log.csv`` row (``step`` and the :data:`VAL_KEYS`)."""
        for k in VAL_KEYS:
            self.writer.add_scalar(f"val/{k}", float(row[k]), int(row["step"]))
        self.writer.flush()
        self._last = time.perf_counter()  # the next step's time leaves the validation out

    def close(self) -> None:
        self.writer.close()
