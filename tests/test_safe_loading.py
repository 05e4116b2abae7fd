"""No code runs from a data file: crafted checkpoints / pickles are refused before their payload runs, the
one-off converter round-trips a legitimate detectron2 ``.pkl`` of arrays, and the package has no unsafe
loader call left."""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from itmatch.features.detector.checkpoint import CheckpointError, read_checkpoint, read_state_dict
from itmatch.features.detector.convert import UnsafePickleError, convert, read_arrays_pickle
from itmatch.models.checkpoint import load_parts
from itmatch.utils.tensors import load_tensors
from tests.conftest import REPO


class Payload:
    """Unpickling this calls ``os.system`` (the classic malicious checkpoint)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _crafted_pth(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "evil": Payload(marker)}, path)
    return path, marker


def _crafted_pkl(tmp_path: Path, name: str = "weights.pkl") -> tuple[Path, Path]:
    marker = tmp_path / "pwned"
    path = tmp_path / name
    with open(path, "wb") as fh:
        pickle.dump({"model": {"w": np.zeros(2, np.float32), "evil": Payload(marker)}}, fh)
    return path, marker


def test_crafted_pth_is_refused_by_every_loader(tmp_path):
    path, marker = _crafted_pth(tmp_path)
    with pytest.raises(CheckpointError, match=r"model\.pth: refused.*system"):
        read_checkpoint(path)
    with pytest.raises(pickle.UnpicklingError):
        load_tensors(path)  # training state / model.pt reader
    with pytest.raises(pickle.UnpicklingError):
        load_parts(str(path))  # evaluation
    with pytest.raises(UnsafePickleError, match="holds torch tensors"):
        convert(path, tmp_path / "out.pth")
    torch.save({"model": {"w": np.zeros(2, np.float32)}, "evil": Payload(marker)}, path)  # numpy only + payload
    with pytest.raises(UnsafePickleError, match=r"model\.pth: refused global (posix|os|nt)\.system"):
        convert(path, tmp_path / "out.pth")
    assert not marker.exists() and not (tmp_path / "out.pth").exists()


def test_crafted_pkl_is_refused_by_loader_and_converter(tmp_path):
    path, marker = _crafted_pkl(tmp_path)
    with pytest.raises(CheckpointError, match=r"weights\.pkl: \.pkl checkpoints are not read.*"
                                              r"python -m itmatch\.features\.detector\.convert"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match="not read"):
        read_state_dict(path)
    with pytest.raises(UnsafePickleError, match=r"weights\.pkl: refused global (posix|os|nt)\.system"):
        convert(path, tmp_path / "out.pth")
    proc = subprocess.run([sys.executable, "-m", "itmatch.features.detector.convert", str(path),
                           str(tmp_path / "out.pth")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 1 and "refused global" in proc.stderr and "system" in proc.stderr
    assert not marker.exists() and not (tmp_path / "out.pth").exists()


@pytest.mark.parametrize("evil", ["builtins.eval", "subprocess.Popen", "numpy.load", "torch.load"])
def test_converter_names_any_other_global(tmp_path, evil):
    module, name = evil.rsplit(".", 1)
    data = f"c{module}\n{name}\n(S'1'\ntR.".encode()  # protocol 0: GLOBAL + call with one string argument
    (tmp_path / "x.pkl").write_bytes(data)
    with pytest.raises(UnsafePickleError, match=re.escape(f"refused global {evil}")):
        read_arrays_pickle(tmp_path / "x.pkl")


def test_converter_refuses_object_arrays(tmp_path):
    path = tmp_path / "obj.pkl"
    with open(path, "wb") as fh:
        pickle.dump({"model": {"w": np.array([1, "a"], dtype=object)}}, fh, protocol=2)
    with pytest.raises(UnsafePickleError, match="not a plain"):
        convert(path, tmp_path / "out.pth")


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_converter_round_trips_arrays(tmp_path, protocol):
    rng = np.random.default_rng(0)
    state = OrderedDict([("backbone.stem.conv1.weight", rng.standard_normal((4, 3, 7, 7)).astype(np.float32)),
                         ("backbone.stem.conv1.norm.running_var", np.ones(4, np.float64)),
                         ("roi_heads.res5.0.conv1.norm.num_batches_tracked", np.array(7, np.int64)),
                         ("mask", np.array([True, False])), ("half", np.arange(6, dtype=np.float16).reshape(2, 3)),
                         ("fortran", np.asfortranarray(rng.standard_normal((3, 5)).astype(np.float32)))])
    src = tmp_path / "published.pkl"
    with open(src, "wb") as fh:
        pickle.dump({"model": state, "__author__": "Detectron2 model zoo", "matching_heuristics": True}, fh,
                    protocol=protocol)
    dst = tmp_path / "published.pth"
    assert convert(src, dst) == len(state)
    got = read_state_dict(dst)  # through the workflow's weights-only reader
    assert list(got) == list(state)
    for k, v in state.items():
        assert got[k].dtype == torch.from_numpy(np.asarray(v)).dtype, k
        np.testing.assert_array_equal(got[k].numpy(), v, err_msg=k)
    meta = torch.load(dst, weights_only=True)
    assert meta["converted_from"] == "published.pkl" and len(meta["source_sha256"]) == 64


def test_converter_reads_a_torch_file_of_numpy_arrays(tmp_path):
    src = tmp_path / "numpy_inside.pth"
    torch.save({"model": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}}, src)
    with pytest.raises(CheckpointError, match="refused"):
        read_checkpoint(src)  # the loader itself takes tensors only
    assert convert(src, tmp_path / "out.pth") == 1
    np.testing.assert_array_equal(read_state_dict(tmp_path / "out.pth")["w"].numpy(),
                                  np.arange(6, dtype=np.float32).reshape(2, 3))


def test_no_unsafe_loader_in_the_package():
    """Acceptance of issue 21 item 1: no torch.load without weights_only=True, no pickle.load, no
    allow_pickle=True in the package or the workflow scripts."""
    offenders = []
    for path in [*(REPO / "itmatch").rglob("*.py"), *(REPO / "workflow").rglob("*.py"), REPO / "Snakefile",
                 *(REPO / "workflow" / "rules").glob("*.smk"), *(REPO / "benchmarks").rglob("*.py")]:
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"torch\.load\(([^()]|\([^()]*\))*\)", text):
            if "weights_only=True" not in m.group(0):
                offenders.append(f"{path}: {m.group(0)}")
        for pat in (r"pickle\.loads?\(", r"allow_pickle\s*=\s*True", r"weights_only\s*=\s*False",
                    r"\bUnpickler\((?!io\.BytesIO)"):
            offenders += [f"{path}: {m.group(0)}" for m in re.finditer(pat, text)]
    assert not offenders, "\n".join(offenders)


def test_crafted_training_state_is_ignored_and_training_runs(tmp_path):
    """A ``.train_state.pt`` next to the outputs is read weights-only: a payload in it never runs, and the
    unreadable state is ignored (training starts afresh), as is an old state holding numpy RNG arrays."""
    from itmatch.corpus.data import Corpus
    from itmatch.corpus.synthetic import write_synthetic_corpus
    from itmatch.training.loop import train_model

    paths = write_synthetic_corpus(tmp_path / "corpus", n_train=8, n_val=4, n_test=4, R=3, D=8)
    corpus = Corpus(paths, frozenset({"blocks"}))
    marker = tmp_path / "pwned"
    cfg = {"num_workers": 0, "device": "cpu", "precision": "fp32",
           "epochs": 1, "batch_size": 4, "val_max_images": 4, "threads": 1, "checkpoint_every_steps": 0}
    for k, state in enumerate(({"key": "x", "loop": Payload(marker)}, {"key": "x", "rng": np.random.get_state()})):
        out = tmp_path / f"o{k}"
        out.mkdir()
        torch.save(state, out / ".state.pt")
        best = train_model("pfan", {"embed_dim": 8, "word_dim": 8, "block_dim": 4, "direction": "t2i"}, cfg, corpus,
                           out / "model.pt", out / "log.csv", out / ".state.pt")
        assert best["step"] == 10 and (out / "model.pt").exists() and not (out / ".state.pt").exists()
    assert not marker.exists()


class _ObjectArrayFromBytes:
    """``numpy.ndarray((1,), "O", buffer)`` turns raw bytes into an object pointer."""

    def __reduce__(self):
        return (np.ndarray, ((1,), "O", b"\x01" * 8))


def test_converter_refuses_calling_ndarray(tmp_path):
    path = tmp_path / "ptr.pkl"
    with open(path, "wb") as fh:
        pickle.dump({"model": {"w": _ObjectArrayFromBytes()}}, fh, protocol=2)
    with pytest.raises(UnsafePickleError, match=r"ptr\.pkl: refused call of numpy\.ndarray"):
        convert(path, tmp_path / "out.pth")
