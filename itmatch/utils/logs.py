"""Logging for workflow jobs: everything (including tqdm bars) goes to the rule's ``log:`` file."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")

log = logging.getLogger("itmatch")


def setup_job_logging(log_file: str | Path | None) -> None:
    """Send the ``itmatch`` logger, warnings, stdout and stderr to ``log_file`` (append)."""
    handlers: list[logging.Handler]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        stream = open(log_file, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (lives with the job)
        sys.stdout = stream
        sys.stderr = stream
        handlers = [logging.StreamHandler(stream)]
    else:
        handlers = [logging.StreamHandler(sys.stderr)]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=handlers, force=True)
    logging.captureWarnings(True)


def progress(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterable[T]:
    """A tqdm progress bar on stderr (the job's log), updated at most every few seconds in logs."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, file=sys.stderr,
                mininterval=0.5 if sys.stderr.isatty() else 5.0, dynamic_ncols=True)
