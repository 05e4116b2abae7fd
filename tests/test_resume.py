"""The shared resume helper: a partial state is used only when readable, of the same run and not stale."""

from __future__ import annotations

import os
import signal

import h5py
import numpy as np
import torch

from itmatch.utils.resume import KEY_ATTR, H5Partial, TensorState, fingerprint, sigterm_flag


def test_fingerprint_is_the_json_hash():
    assert fingerprint(["a", {"b": 1, "a": 2}]) == fingerprint(["a", {"a": 2, "b": 1}])
    assert len(fingerprint({"x": 1})) == 16 and len(fingerprint({"x": 1}, length=64)) == 64
    ids = np.arange(3, dtype=np.int64).tobytes()
    assert fingerprint([1], ids, length=64) != fingerprint([1], length=64)
    assert fingerprint([1], ids, length=64).startswith(fingerprint([1], ids))


def test_tensor_state_round_trip_and_rejections(tmp_path):
    path = tmp_path / "state.pt"
    state = TensorState(path, "k1")
    assert state.load() is None  # nothing saved yet
    state.save({"step": 3, "w": torch.arange(4.0)})
    got = state.load()
    assert got["key"] == "k1" and got["step"] == 3 and torch.equal(got["w"], torch.arange(4.0))
    assert TensorState(path, "k2").load() is None  # other settings
    newer = tmp_path / "input.txt"
    newer.write_text("x")
    os.utime(path, (1, 1))
    assert state.load(inputs=[newer]) is None  # older than an input
    assert state.load(inputs=[tmp_path / "missing"]) is not None  # absent inputs do not count
    path.write_bytes(b"not a torch file")
    assert state.load() is None  # unreadable
    state.discard()
    assert not path.exists()
    state.discard()  # nothing to delete: no error


def test_h5_partial_resumes_only_its_own_run(tmp_path):
    path, out = tmp_path / ".x.partial.h5", tmp_path / "x.h5"
    with h5py.File(path, "w") as f:
        f.attrs[KEY_ATTR] = "k1"
        f.create_dataset("done", data=np.array([5]))
    f = H5Partial(path, "k1").open(lambda g: int(g["done"][0]) <= 10)
    assert f is not None and int(f["done"][0]) == 5
    f.close()
    assert H5Partial(path, "k1").open(lambda g: g["missing"] is None) is None  # damaged (KeyError): removed
    assert not path.exists()
    with h5py.File(path, "w") as f:
        f.attrs[KEY_ATTR] = "k1"
    assert H5Partial(path, "k2").open() is None and not path.exists()  # another run: removed
    path.write_bytes(b"garbage")
    assert H5Partial(path, "k1").open() is None and not path.exists()  # unreadable: removed
    with h5py.File(path, "w") as f:
        f.attrs[KEY_ATTR] = "k1"
    assert H5Partial(path, "k1").finish(out) == out and out.exists() and not path.exists()


def test_sigterm_sets_the_flag_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    with sigterm_flag() as terminated:
        assert not terminated()
        os.kill(os.getpid(), signal.SIGTERM)
        assert terminated()
    assert signal.getsignal(signal.SIGTERM) == before
