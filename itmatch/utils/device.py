"""Torch device and precision helpers shared by every stage that can use a GPU.

- :func:`resolve_device` turns a stage's ``device`` setting (``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``) into a
  :class:`torch.device`, logs the device it picked, warns when the job was given a GPU (``CUDA_VISIBLE_DEVICES``
  or a SLURM GPU allocation) that torch cannot use (``auto`` → CPU) and refuses ``cuda`` in that case.
- Several local GPUs: before CUDA initialises, :func:`claim_local_gpu` gives the job a free device of its own
  (an exclusive ``fcntl.flock`` on a per-device lock file, held until the process ends — also when it is killed)
  and narrows ``CUDA_VISIBLE_DEVICES`` to it; ``auto`` claims only where torch may use CUDA
  (:func:`cuda_possible`: a CUDA build and a loadable driver), so a CPU job never waits for a GPU's lock.
  Under SLURM the job's own allocation is used as it is.
- :func:`resolve_precision` / :func:`autocast` implement ``precision: auto | fp32 | bf16 | fp16``.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from itmatch.utils.logs import log

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"bf16": "bfloat16", "fp16": "float16"}  # torch dtype names (torch is imported where used: the
# Snakefile reads the GPU helpers at parse time, and importing torch there costs every snakemake command seconds)

# Environment: simulated device count (tests, or a machine whose GPUs nvidia-smi does not list), lock folder.
SIMULATED_GPUS_ENV = "ITMATCH_SIMULATED_GPUS"
LOCK_DIR_ENV = "ITMATCH_GPU_LOCK_DIR"
_SLURM_GPU_VARS = ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS")

_claimed: dict[str, object] = {}  # the open lock file of this process's device (kept open until exit)


def uses_gpu(device: str) -> int:
    """1 when a stage with this ``device`` setting may run on CUDA (``resources: gpu=1``), else 0."""
    return int(str(device) != "cpu")


def allocated_gpus(env: dict[str, str] | None = None) -> str | None:
    """``NAME=value`` of the variable that says this job was given a GPU, or None.

    Given = ``CUDA_VISIBLE_DEVICES`` set, non-empty and not ``-1``; or a SLURM GPU allocation
    (``SLURM_JOB_GPUS``, ``SLURM_STEP_GPUS``, ``SLURM_GPUS*`` non-empty and not ``0``).
    """
    env = os.environ if env is None else env
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        return f"CUDA_VISIBLE_DEVICES={cvd}" if cvd.strip() not in ("", "-1") else None
    for name in sorted(env):
        if name in _SLURM_GPU_VARS or name.startswith("SLURM_GPUS"):
            value = env[name].strip()
            if value and value not in ("0", "-1"):
                return f"{name}={env[name]}"
    return None


def cuda_unavailable_reason() -> str:
    """Why torch cannot use CUDA here, in words."""
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    return (f"torch {torch.__version__} (built for CUDA {torch.version.cuda}) sees no usable device "
            "(no driver, a driver older than the build's CUDA, or the devices are hidden)")


def cuda_driver_present() -> bool:
    """Whether the CUDA driver library loads (loading it does not initialise CUDA)."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def cuda_possible(env: dict[str, str] | None = None) -> bool:
    """Whether torch may be able to use CUDA here, decided without initialising CUDA (which would fix the visible
    devices before a local GPU is claimed): a CUDA build of torch and a loadable driver, or simulated GPUs."""
    import torch

    env = os.environ if env is None else env
    if env.get(SIMULATED_GPUS_ENV):
        return True
    return torch.version.cuda is not None and cuda_driver_present()


def _on_slurm(env: dict[str, str]) -> bool:
    return "SLURM_JOB_ID" in env


def local_gpu_candidates(env: dict[str, str] | None = None) -> list[str]:
    """Device ids this process may choose from: ``CUDA_VISIBLE_DEVICES`` when set, else
    ``ITMATCH_SIMULATED_GPUS`` (a count; simulation for tests), else the GPUs ``nvidia-smi -L`` lists."""
    env = os.environ if env is None else env
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        return [d.strip() for d in cvd.split(",") if d.strip() and d.strip() != "-1"]
    if env.get(SIMULATED_GPUS_ENV):
        return [str(i) for i in range(int(env[SIMULATED_GPUS_ENV]))]
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(l for l in out.splitlines() if l.startswith("GPU "))]


def local_gpu_count(env: dict[str, str] | None = None) -> int:
    """How many GPUs local jobs can take (:func:`local_gpu_candidates`): the workflow's local ``gpu`` cap."""
    return len(local_gpu_candidates(env))


def lock_dir(env: dict[str, str] | None = None) -> Path:
    """Folder of the per-device lock files (shared by every job on this machine)."""
    env = os.environ if env is None else env
    return Path(env.get(LOCK_DIR_ENV) or Path(tempfile.gettempdir()) / f"itmatch-gpu-locks-{os.getuid()}")


def claim_local_gpu(env: dict[str, str] | None = None, wait: float | None = None, poll: float = 1.0,
                    index: int | None = None) -> str | None:
    """Give this process a local GPU of its own and return its id (None: nothing to do).

    Does nothing under SLURM (the job's allocation is its own), on a machine without GPUs, or when this
    process already holds one. Otherwise takes the first device whose lock file in :func:`lock_dir` is free
    (non-blocking exclusive ``flock``; the kernel releases it when the process ends, killed or not), sets
    ``CUDA_VISIBLE_DEVICES`` to it and keeps the lock until exit. ``index`` (``device: cuda:N``): only the N-th
    candidate, as CUDA numbers the visible devices. When the device(s) are taken it waits (``wait`` seconds,
    None = until one is free). Must run before CUDA initialises in this process.
    """
    env = os.environ if env is None else env
    if _on_slurm(env):
        return None
    if "device" in _claimed:
        if index is not None and _claimed.get("index") not in (None, index):
            raise RuntimeError(f"this process already holds local GPU {_claimed['device']} (cuda:{_claimed['index']}); "
                               f"it cannot also take cuda:{index}")
        return str(_claimed["device"])
    devices = local_gpu_candidates(env)
    if len(devices) == 0:
        return None
    if index is not None:
        if not 0 <= index < len(devices):
            raise RuntimeError(f"device cuda:{index} asked for, but this machine shows {len(devices)} GPU(s) "
                               f"({','.join(devices)}; cuda:0 to cuda:{len(devices) - 1})")
        devices = [devices[index]]
    folder = lock_dir(env)
    folder.mkdir(parents=True, exist_ok=True)
    start, told = time.monotonic(), False
    while True:
        for dev in devices:
            fh = open(folder / f"gpu{dev}.lock", "a+")  # noqa: SIM115 (held open for the process's lifetime)
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.close()
                continue
            fh.seek(0)
            fh.truncate()
            fh.write(f"{os.getpid()}\n")
            fh.flush()
            _claimed.update(device=dev, handle=fh, index=index)
            env["CUDA_VISIBLE_DEVICES"] = dev
            log.info("local GPU %s of %s assigned to this job (lock %s)", dev, ",".join(devices), fh.name)
            return dev
        if wait is not None and time.monotonic() - start >= wait:
            raise TimeoutError(f"all local GPUs ({','.join(devices)}) stayed busy for {wait:.0f} s (locks in "
                               f"{folder}); run fewer GPU jobs at once (--resources gpu=N)")
        if not told:
            log.info("all local GPUs (%s) are taken by other jobs; waiting for one", ",".join(devices))
            told = True
        time.sleep(poll)


def release_local_gpu() -> None:
    """Give back this process's local GPU (it is released at exit anyway)."""
    fh = _claimed.pop("handle", None)
    _claimed.pop("device", None)
    _claimed.pop("index", None)
    if fh is not None:
        fcntl.flock(fh, fcntl.LOCK_UN)  # type: ignore[arg-type]
        fh.close()  # type: ignore[attr-defined]


def resolve_device(name: str, stage: str = "device") -> torch.device:
    """A stage's ``device`` setting → the device used, logged.

    ``cpu``: the CPU. ``auto``: a GPU of this job's own when torch can use one, else the CPU, with a warning
    when the job was given a GPU that torch cannot use. ``cuda`` / ``cuda:N``: the GPU, or a RuntimeError
    naming ``stage`` and the reason when torch cannot use CUDA (never a silent CPU run). Locally (no SLURM),
    ``cuda:N`` takes — waiting for it if another job holds it — the lock of the N-th visible device, which the
    job then sees as ``cuda:0`` (its CUDA_VISIBLE_DEVICES narrowed to it).
    """
    import torch

    name = str(name)
    if name not in DEVICES and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise ValueError(f"{stage}: device must be one of {', '.join(DEVICES)} (or cuda:N), got {name!r}")
    if name == "cpu":
        log.info("%s: using the CPU (device: cpu)", stage)
        return torch.device("cpu")
    index = int(name.split(":", 1)[1]) if name.startswith("cuda:") else None
    claimed = None
    if name != "auto" or cuda_possible():  # auto never takes (nor waits for) a GPU that torch cannot use
        try:
            claimed = claim_local_gpu(index=index)
        except RuntimeError as e:
            raise RuntimeError(f"{stage}: {e}") from None
    given = allocated_gpus()
    if torch.cuda.is_available():
        # a claimed device is the only one this job sees (CUDA_VISIBLE_DEVICES narrowed): cuda:N is its cuda:0
        dev = torch.device("cuda" if name == "auto" or claimed is not None else name)
        log.info("%s: using %s (%s; device: %s%s)", stage, dev, torch.cuda.get_device_name(dev), name,
                 f", local GPU {claimed}" if claimed is not None else "")
        return dev
    reason = cuda_unavailable_reason()
    if name != "auto":
        raise RuntimeError(f"{stage} is {name!r} but torch cannot use CUDA: {reason}"
                           + (f"; this job was given {given}" if given else "") + " (use 'auto' or 'cpu')")
    if given:
        log.warning("%s: this job was given a GPU (%s) but torch cannot use it: %s; running on the CPU",
                    stage, given, reason)
    log.info("%s: using the CPU (device: auto, no usable CUDA device)", stage)
    return torch.device("cpu")


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch's tensors on ``device`` (the batch itself on the CPU); float16 tensors (features collated as
    stored, to halve the host → GPU bytes) become float32 on the GPU."""
    import torch

    if device.type == "cpu":
        return batch
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.float() if v.dtype == torch.float16 else v for k, v in out.items()}


def resolve_precision(precision: str, device: torch.device, stage: str = "precision") -> str:
    """``auto`` → ``fp32`` on the CPU, ``bf16`` on a GPU that supports it (else ``fp32``); others as given.

    ``fp16`` / ``bf16`` on the CPU are honoured (CPU autocast; slow, meant for measuring tolerances);
    ``bf16`` on a GPU without bf16 support is an error naming ``stage``.
    """
    import torch

    precision = str(precision)
    if precision not in PRECISIONS:
        raise ValueError(f"{stage} must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{stage} is 'bf16' but {torch.cuda.get_device_name(device)} does not support bfloat16 "
                         "(use fp16 or fp32)")
    return precision


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for a resolved ``precision`` (``fp32``: no autocast)."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=getattr(torch, DTYPES[precision]))
