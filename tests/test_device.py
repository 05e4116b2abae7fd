"""Devices and precision: GPU-given-but-unusable warnings/errors, local per-job GPU assignment (simulated
devices, flock), precision resolution and that autocast and the grad scaler are honoured."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from itmatch.corpus.data import Corpus
from itmatch.corpus.synthetic import write_synthetic_corpus
from itmatch.evaluation.evaluate import similarity, split_rows
from itmatch.models.registry import build_model
from itmatch.models.scan import SCAN
from itmatch.training.loop import train_model
from itmatch.utils import device as D

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No GPU variables, locks in a private folder, no device held before or after; os.environ exactly as before
    afterwards (the code under test narrows CUDA_VISIBLE_DEVICES itself, which monkeypatch alone would not undo
    when a test's first touch of the variable is a delenv: it would restore the narrowed value)."""
    saved = dict(os.environ)
    for k in list(os.environ):
        if k == "CUDA_VISIBLE_DEVICES" or k.startswith("SLURM_") or k == D.SIMULATED_GPUS_ENV:
            monkeypatch.delenv(k)
    monkeypatch.setenv(D.LOCK_DIR_ENV, str(tmp_path / "locks"))
    monkeypatch.setattr(D.shutil, "which", lambda name: None)  # no nvidia-smi: only simulated devices
    D.release_local_gpu()
    yield monkeypatch
    D.release_local_gpu()
    monkeypatch.undo()
    os.environ.clear()
    os.environ.update(saved)


def test_allocated_gpus_reads_cuda_and_slurm_variables():
    assert D.allocated_gpus({}) is None
    assert D.allocated_gpus({"CUDA_VISIBLE_DEVICES": "1"}) == "CUDA_VISIBLE_DEVICES=1"
    assert D.allocated_gpus({"CUDA_VISIBLE_DEVICES": "-1", "SLURM_JOB_GPUS": "0"}) is None  # hidden on purpose
    assert D.allocated_gpus({"CUDA_VISIBLE_DEVICES": ""}) is None
    assert D.allocated_gpus({"SLURM_JOB_GPUS": "3"}) == "SLURM_JOB_GPUS=3"
    assert D.allocated_gpus({"SLURM_STEP_GPUS": "0,1"}) == "SLURM_STEP_GPUS=0,1"
    assert D.allocated_gpus({"SLURM_GPUS_ON_NODE": "2"}) == "SLURM_GPUS_ON_NODE=2"
    assert D.allocated_gpus({"SLURM_GPUS_ON_NODE": "0"}) is None
    assert D.uses_gpu("auto") == 1 and D.uses_gpu("cuda") == 1 and D.uses_gpu("cpu") == 0


@pytest.mark.parametrize("var,value", [("CUDA_VISIBLE_DEVICES", "0"), ("SLURM_JOB_GPUS", "2")])
def test_gpu_given_but_cuda_unavailable_auto_warns_cuda_fails(clean_env, caplog, var, value):
    clean_env.setenv(var, value)
    if var.startswith("SLURM"):
        clean_env.setenv("SLURM_JOB_ID", "123")
    clean_env.setattr(torch.cuda, "is_available", lambda: False)  # as with a CPU-only torch or a broken driver
    with caplog.at_level(logging.INFO, logger="itmatch"):
        assert D.resolve_device("auto", "training.device") == torch.device("cpu")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, caplog.text
    msg = warnings[0].getMessage()
    assert f"training.device: this job was given a GPU ({var}={value}) but torch cannot use it" in msg
    assert "running on the CPU" in msg
    assert "using the CPU (device: auto" in caplog.text
    with pytest.raises(RuntimeError, match=rf"evaluation.device is 'cuda' but torch cannot use CUDA: .*"
                                           rf"this job was given {var}={value}"):
        D.resolve_device("cuda", "evaluation.device")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="itmatch"):  # device: cpu is a choice, not a problem
        assert D.resolve_device("cpu", "training.device") == torch.device("cpu")
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "using the CPU (device: cpu)" in caplog.text


def test_no_gpu_given_auto_is_cpu_without_warning(clean_env, caplog):
    clean_env.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.INFO, logger="itmatch"):
        assert D.resolve_device("auto", "x") == torch.device("cpu")
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    with pytest.raises(ValueError, match="x: device must be one of auto, cpu, cuda"):
        D.resolve_device("gpu", "x")


_HOLDER = r"""
import sys, time
from pathlib import Path
from itmatch.utils.device import claim_local_gpu
import os
dev = claim_local_gpu(poll=0.05)
print(f"{dev} {os.environ.get('CUDA_VISIBLE_DEVICES')}", flush=True)
Path(sys.argv[1]).touch()
time.sleep(120)
"""


def _holder(tmp_path: Path, name: str, env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
    flag = tmp_path / f"{name}.ready"
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(flag)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            text=True)
    return proc, flag


def _wait(flag: Path, timeout: float = 60) -> None:
    end = time.time() + timeout
    while not flag.exists():
        assert time.time() < end, f"{flag} never appeared"
        time.sleep(0.05)


def test_concurrent_jobs_get_different_local_gpus_and_a_killed_holder_frees_its_device(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES" and not k.startswith("SLURM_")}
    env.update({D.SIMULATED_GPUS_ENV: "2", D.LOCK_DIR_ENV: str(tmp_path / "locks"), "PATH": "/usr/bin:/bin"})
    procs = []
    try:
        a, fa = _holder(tmp_path, "a", env)
        b, fb = _holder(tmp_path, "b", env)
        procs += [a, b]
        _wait(fa)
        _wait(fb)
        la, lb = a.stdout.readline().split(), b.stdout.readline().split()
        assert {la[0], lb[0]} == {"0", "1"}  # two jobs, two devices ...
        assert la[0] == la[1] and lb[0] == lb[1]  # ... each with CUDA_VISIBLE_DEVICES narrowed to its own
        c, fc = _holder(tmp_path, "c", env)  # a third job waits: both devices are taken
        procs.append(c)
        time.sleep(1.0)
        assert not fc.exists()
        os.kill(a.pid, signal.SIGKILL)  # killed holder: the kernel drops its flock
        a.wait(timeout=30)
        _wait(fc)
        line = c.stdout.readline().split()
        assert line == la  # the killed job's device, not the one b still holds
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)


def test_claim_respects_cuda_visible_devices_and_slurm(clean_env):
    clean_env.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert D.claim_local_gpu() == "3" and os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    assert D.claim_local_gpu() == "3"  # the same process keeps its device
    D.release_local_gpu()
    clean_env.setenv("SLURM_JOB_ID", "42")
    clean_env.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert D.claim_local_gpu() is None and os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"  # SLURM: its own allocation
    clean_env.delenv("SLURM_JOB_ID")
    clean_env.delenv("CUDA_VISIBLE_DEVICES")
    assert D.claim_local_gpu() is None  # no GPUs at all: nothing to do
    clean_env.setenv(D.SIMULATED_GPUS_ENV, "1")
    assert D.claim_local_gpu() == "0"
    holder = D._claimed["handle"]
    D._claimed.clear()  # pretend another process holds device 0
    with pytest.raises(TimeoutError, match=r"all local GPUs \(0\) stayed busy"):
        D.claim_local_gpu(wait=0.2, poll=0.05)
    D._claimed.update(device="0", handle=holder)


def test_explicit_cuda_index_takes_that_local_gpu(clean_env, tmp_path):
    """``device: cuda:N`` with local locks: the N-th visible device's lock, the job sees it as cuda:0."""
    import fcntl

    clean_env.setenv(D.SIMULATED_GPUS_ENV, "4")
    clean_env.setattr(torch.cuda, "is_available", lambda: True)
    clean_env.setattr(torch.cuda, "get_device_name", lambda dev=None: "simulated")
    dev = D.resolve_device("cuda:2", "training.device")
    assert dev == torch.device("cuda") and os.environ["CUDA_VISIBLE_DEVICES"] == "2"
    lock = tmp_path / "locks" / "gpu2.lock"
    assert lock.read_text().strip() == str(os.getpid())
    with open(lock, "a+") as fh, pytest.raises(OSError):  # held: another job cannot take it
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert D.resolve_device("cuda:2", "x") == torch.device("cuda")  # the same process keeps it
    with pytest.raises(RuntimeError, match=r"already holds local GPU 2 \(cuda:2\); it cannot also take cuda:1"):
        D.resolve_device("cuda:1", "x")
    holder = D._claimed["handle"]
    D._claimed.clear()  # another process holds device 2: cuda:2 waits for it, never takes another one
    clean_env.delenv("CUDA_VISIBLE_DEVICES")  # (as narrowed by the claim above)
    with pytest.raises(TimeoutError, match=r"all local GPUs \(2\) stayed busy"):
        D.claim_local_gpu(wait=0.2, poll=0.05, index=2)
    assert D.claim_local_gpu(index=3) == "3" and os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    D.release_local_gpu()
    clean_env.delenv("CUDA_VISIBLE_DEVICES")
    D._claimed.update(device="2", handle=holder, index=2)
    D.release_local_gpu()
    clean_env.setenv("CUDA_VISIBLE_DEVICES", "5,7")  # N counts the visible devices, as CUDA does
    assert D.resolve_device("cuda:1", "x") == torch.device("cuda") and os.environ["CUDA_VISIBLE_DEVICES"] == "7"
    D.release_local_gpu()
    clean_env.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    with pytest.raises(RuntimeError, match=r"training.device: device cuda:2 asked for, but this machine shows 2"):
        D.resolve_device("cuda:2", "training.device")
    with pytest.raises(ValueError, match="device must be one of"):
        D.resolve_device("cuda:x", "x")
    clean_env.setenv("SLURM_JOB_ID", "9")  # SLURM: its own allocation, the index as given, no lock
    assert D.resolve_device("cuda:1", "x") == torch.device("cuda:1") and os.environ["CUDA_VISIBLE_DEVICES"] == "5,7"


def test_precision_resolution():
    cpu = torch.device("cpu")
    assert D.resolve_precision("auto", cpu) == "fp32"
    assert D.resolve_precision("bf16", cpu) == "bf16" and D.resolve_precision("fp16", cpu) == "fp16"
    with pytest.raises(ValueError, match="training.precision must be one of auto, fp32, bf16, fp16, got 'half'"):
        D.resolve_precision("half", cpu, "training.precision")
    a = torch.randn(4, 4)
    for p, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        with D.autocast(cpu, p):
            assert (a @ a).dtype == dtype, p


@pytest.fixture(scope="module")
def corpus_paths(tmp_path_factory):
    return write_synthetic_corpus(tmp_path_factory.mktemp("corpus"), n_train=8, n_val=4, n_test=4, R=5, D=16)


MODEL_CFG = {"embed_dim": 16, "word_dim": 8, "direction": "t2i"}
TRAIN_CFG = {"num_workers": 0, "device": "cpu", "precision": "fp32",
             "epochs": 1, "batch_size": 8, "lr": 2e-3, "val_max_images": 4, "checkpoint_every_steps": 0,
             "threads": 1, "seed": 1}


@pytest.mark.parametrize("precision,dtype,scaled", [("fp32", None, False), ("auto", None, False),
                                                    ("bf16", torch.bfloat16, False), ("fp16", torch.float16, True)])
def test_training_honours_precision(corpus_paths, tmp_path, monkeypatch, precision, dtype, scaled):
    seen, scaler_calls = [], []
    orig = SCAN.loss

    def spy(self, *a, **k):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return orig(self, *a, **k)

    orig_scale = torch.amp.GradScaler.scale

    def scale_spy(self, outputs):
        scaler_calls.append(self.is_enabled())
        return orig_scale(self, outputs)

    monkeypatch.setattr(SCAN, "loss", spy)
    monkeypatch.setattr(torch.amp.GradScaler, "scale", scale_spy)
    corpus = Corpus(corpus_paths)
    best = train_model("scan", MODEL_CFG, {**TRAIN_CFG, "precision": precision}, corpus, tmp_path / "m.pt",
                       tmp_path / "log.csv", tmp_path / ".state.pt")
    assert seen and set(seen) == {dtype}
    assert scaler_calls and set(scaler_calls) == {scaled}
    assert all(torch.isfinite(v).all() for v in best["state_dict"].values())


def _overflowing_loss(monkeypatch, overflow_calls: set[int] | None, also_fp32: bool = False) -> list:
    """SCAN's loss × inf on the given autocast calls (every autocast call when None), as a reduced-precision
    overflow gives; with ``also_fp32`` on the fp32 recomputation too (a real divergence). Returns the call log."""
    calls, orig = [], SCAN.loss

    def loss(self, *a, **k):
        auto = torch.is_autocast_enabled("cpu")
        calls.append(auto)
        out, extra = orig(self, *a, **k)
        n = sum(calls)
        if (auto and (overflow_calls is None or n in overflow_calls)) or (also_fp32 and not auto):
            out = out * float("inf")
        return out, extra

    monkeypatch.setattr(SCAN, "loss", loss)
    return calls


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_overflow_steps_are_skipped_not_divergence(corpus_paths, tmp_path, monkeypatch, caplog, precision):
    calls = _overflowing_loss(monkeypatch, {1, 2, 3})  # the first three steps overflow (5 steps in all)
    applied = []
    orig_step = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: applied.append(1) or orig_step(self, *a, **k))
    corpus = Corpus(corpus_paths)
    with caplog.at_level(logging.INFO, logger="itmatch"):
        best = train_model("scan", MODEL_CFG, {**TRAIN_CFG, "precision": precision}, corpus, tmp_path / "m.pt",
                           tmp_path / "log.csv", tmp_path / ".state.pt")
    assert (tmp_path / "m.pt").exists() and all(torch.isfinite(v).all() for v in best["state_dict"].values())
    assert calls.count(False) >= 3  # each overflow was checked in fp32 (plus the validation's forward passes)
    skipped = [r.getMessage() for r in caplog.records if "overflow at epoch" in r.getMessage()]
    assert all("(loss inf, finite in fp32)" in m for m in skipped[:3]), skipped
    assert len(applied) == 5 - len(skipped)  # 5 steps: the skipped ones were not applied
    if precision == "fp16":  # GradScaler halved its scale on each: 2**16 → 2**13, and on any further overflow
        # of the scaled gradients (fp16 on the CPU overflows at first: the scale settles lower)
        scales = [int(m.rsplit("loss scale now ", 1)[1]) for m in skipped]
        assert scales == [2 ** (15 - i) for i in range(len(scales))] and len(scales) >= 3
    else:
        assert len(skipped) == 3


def test_non_finite_fp32_loss_or_persistent_overflow_stop_without_a_model(corpus_paths, tmp_path, monkeypatch):
    from itmatch.training.loop import MAX_OVERFLOW_STEPS, TrainingDiverged

    corpus = Corpus(corpus_paths)
    _overflowing_loss(monkeypatch, {2}, also_fp32=True)  # non-finite in fp32 too: a divergence
    with pytest.raises(TrainingDiverged, match=r"non-finite loss \(inf\) at epoch 0, step 2"):
        train_model("scan", MODEL_CFG, {**TRAIN_CFG, "precision": "fp16"}, corpus, tmp_path / "a.pt",
                    tmp_path / "a.csv", tmp_path / ".a.pt")
    monkeypatch.undo()
    _overflowing_loss(monkeypatch, None)  # every fp16 step overflows: stops after MAX_OVERFLOW_STEPS of them
    with pytest.raises(TrainingDiverged, match=rf"{MAX_OVERFLOW_STEPS + 1} consecutive steps overflowed under fp16"):
        train_model("scan", MODEL_CFG, {**TRAIN_CFG, "precision": "fp16", "batch_size": 2, "epochs": 3}, corpus,
                    tmp_path / "b.pt", tmp_path / "b.csv", tmp_path / ".b.pt")
    assert not any(tmp_path.glob("[ab].pt")) and not any(tmp_path.glob("[ab].csv"))


def test_fp32_results_unchanged_and_bf16_scores_close(corpus_paths, tmp_path):
    corpus = Corpus(corpus_paths)
    torch.manual_seed(0)
    model = build_model("scan", MODEL_CFG, corpus.info)
    image_rows, caption_rows, _ = split_rows(corpus, "test")
    ref = similarity(model, corpus, image_rows, caption_rows)  # the default
    assert np.array_equal(similarity(model, corpus, image_rows, caption_rows, precision="fp32"), ref)
    low = similarity(model, corpus, image_rows, caption_rows, precision="bf16")
    assert low.dtype == np.float32 and not np.array_equal(low, ref)  # bf16 was really used
    assert np.abs(low - ref).max() < 0.05


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_device_check_without_cuda_skips_throughput_and_exits_0(tmp_path):
    out = tmp_path / "dc"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "device_check.py"), str(out), "--skip-tests"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the throughput part is SKIPPED" in proc.stdout
    report = json.loads((out / "device_check.json").read_text())
    assert report["env"]["cuda_available"] is False
    assert report["throughput_skipped"].startswith("no CUDA device: torch ")
    assert "extraction" not in report and "training" not in report
    md = (out / "device_check.md").read_text()
    assert "## 2. Throughput" in md and "SKIPPED: no CUDA device" in md


def test_auto_never_waits_for_a_gpu_torch_cannot_use(clean_env, tmp_path):
    """device: auto where the job sees a GPU (CUDA_VISIBLE_DEVICES) but torch cannot use CUDA: the CPU at once, no
    lock taken, even when another job holds that GPU's lock (it used to wait for it)."""
    import fcntl

    clean_env.setenv("CUDA_VISIBLE_DEVICES", "0")
    clean_env.setattr(D, "cuda_driver_present", lambda: False)  # as on a machine without the NVIDIA driver
    (tmp_path / "locks").mkdir()
    with open(tmp_path / "locks" / "gpu0.lock", "a+") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another job holds GPU 0
        done: list[torch.device] = []
        t = threading.Thread(target=lambda: done.append(D.resolve_device("auto", "training.device")), daemon=True)
        t.start()
        t.join(timeout=20)
        assert done == [torch.device("cpu")], "resolve_device('auto') waited for a GPU lock"
    assert "device" not in D._claimed and os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    assert not D.cuda_possible({}) and D.cuda_possible({D.SIMULATED_GPUS_ENV: "2"})
    clean_env.setattr(D, "cuda_driver_present", lambda: True)
    clean_env.setattr(torch.version, "cuda", None)  # a CPU-only build
    assert not D.cuda_possible({})
