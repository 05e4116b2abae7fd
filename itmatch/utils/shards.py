"""Scatter helpers shared by the sharded stages (region extraction, VGG grid, referral-tree parses, BERT).

A stage split over Snakemake's ``scattergather`` runs one job per ``{scatteritem}`` ("3-of-8", 1-based); each
job covers a contiguous range of the input's rows (:func:`shard_rows`, or :func:`block_shard_rows` where the
result of a row depends on the block it is processed in, so that every shard count gives the very same
blocks), and writes a *throughput record* (:func:`shard_record`: rows, seconds, rows/s and the device, named,
so a benchmark can compare GPUs) both into its log and into a small JSON file beside its output.

Kept free of heavy imports (no OpenCV, no torch at import time): the text environment uses it too.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

from itmatch.utils.io import write_json
from itmatch.utils.logs import log


def shard_rows(n: int, shard: int, n_shards: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of shard ``shard`` (0-based) of ``n_shards`` over ``n`` rows."""
    if not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} outside 0..{n_shards - 1}")
    return n * shard // n_shards, n * (shard + 1) // n_shards


def block_shard_rows(n: int, block: int, shard: int, n_shards: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of shard ``shard`` of ``n_shards`` when ``n`` rows are processed in blocks of
    ``block`` counted from row 0: the shards split the blocks (not the rows), so every block — and with it
    every batch inside it — is the same whatever the shard count. More shards than blocks leave some empty."""
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    a, b = shard_rows((n + block - 1) // block, shard, n_shards)
    return min(a * block, n), min(b * block, n)


def parse_scatteritem(item: str) -> tuple[int, int]:
    """Snakemake's ``{scatteritem}`` ("3-of-8", 1-based) → (shard 0-based, n_shards)."""
    try:
        i, n = item.split("-of-")
        return int(i) - 1, int(n)
    except ValueError as e:
        raise ValueError(f"scatter item {item!r}: expected '<i>-of-<n>'") from e


def device_label(device: Any) -> str:
    """A device in words for a throughput record: ``cpu (<processor>, <k> threads)`` or
    ``cuda:0 (<GPU name>, CUDA_VISIBLE_DEVICES=<ids>)`` (which physical GPU the job had)."""
    import torch

    dev = torch.device(str(device))
    if dev.type == "cuda":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        name = torch.cuda.get_device_name(dev)
        return f"{dev} ({name}" + (f", CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ")")
    return f"{dev} ({_cpu_name()}, {torch.get_num_threads()} threads)"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine()


def shard_record(stage: str, shard: int, n_shards: int, rows: tuple[int, int], done_before: int, processed: int,
                 seconds: float, device: str, unit: str = "captions", **extra: Any) -> dict[str, Any]:
    """A shard job's throughput record: ``<unit>_per_s`` over the rows this run processed (a resumed run does not
    count what an earlier one wrote; model loading is not timed)."""
    return {"stage": stage, "shard": shard + 1, "n_shards": n_shards, "row_start": rows[0], "row_stop": rows[1],
            "resumed_at": done_before, unit: processed, "seconds": round(seconds, 3),
            f"{unit}_per_s": round(processed / seconds, 3) if seconds > 0 and processed else None,
            "device": device, **extra}


def write_shard_record(path: str | os.PathLike | None, record: dict[str, Any], unit: str = "captions") -> None:
    """Log ``record`` and write it as JSON to ``path`` (atomically; nothing when ``path`` is None)."""
    rate = record.get(f"{unit}_per_s")
    log.info("%s shard %d/%d: %d %s in %.1f s (%s %s/s) on %s", record["stage"], record["shard"],
             record["n_shards"], record[unit], unit, record["seconds"], "-" if rate is None else f"{rate:.2f}",
             unit, record["device"])
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_json(path, record)


def log_shard_records(paths, unit: str = "captions") -> list[dict[str, Any]]:
    """Read the shard records a gather job gets (JSON files) and log them, one line each."""
    records = []
    for p in paths:
        with open(p, encoding="utf-8") as fh:
            records.append(json.load(fh))
    for r in records:
        rate = r.get(f"{unit}_per_s")
        log.info("  shard %s/%s: rows %s..%s, %s %s in %.1f s (%s/s) on %s", r["shard"], r["n_shards"],
                 r["row_start"], r["row_stop"], r[unit], unit, r["seconds"], "-" if rate is None else f"{rate:.2f}",
                 r["device"])
    return records
