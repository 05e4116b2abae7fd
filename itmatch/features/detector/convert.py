"""Convert a published detectron2-format ``.pkl`` detector checkpoint into a tensors-only ``.pth``, once.

Usage::

    python -m itmatch.features.detector.convert IN.pkl OUT.pth
    python -m itmatch.features.detector.convert IN.pth OUT.pth   # a torch file holding numpy arrays

A pickle can run any code when it is read, and these files come from third parties, so the workflow never
unpickles one (``detector.checkpoints`` refuses ``.pkl``). This converter reads the file with a restricted
unpickler: the only globals it resolves are those that rebuild numpy arrays and scalars of plain (numeric or
bool) dtypes, ``collections.OrderedDict`` and ``_codecs.encode`` (how protocol-2 pickles spell bytes);
dict, list, tuple, str, int, float, bool and None need no global. Anything else — ``os.system``,
``builtins.eval``, an object-dtype array, any class — stops the conversion with an error naming the
offending global, before it is called. The arrays (top level or under ``"model"``) are written with
``torch.save`` as ``{"model": {name: tensor}, "converted_from": name, "source_sha256": hex}``, which the
loader reads with ``torch.load(weights_only=True)``. A torch (zip) file that holds numpy arrays and no
tensors is converted the same way (its ``data.pkl`` goes through the same unpickler).
"""

from __future__ import annotations

import argparse
import codecs
import collections
import io
import pickle
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from itmatch.utils.hashing import sha256_file
from itmatch.utils.tensors import save_tensors

# numpy moved its private modules from numpy.core to numpy._core in 2.0; pickles name either.
_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric", "numpy._core.numeric")


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle references something other than plain arrays and containers (the message names it)."""


def _plain_dtype(*args: Any) -> np.dtype:
    dt = np.dtype(*args)
    if dt.hasobject or dt.kind not in "biufc":
        raise UnsafePickleError(f"numpy dtype {dt!r} is not a plain numeric dtype")
    return dt


class _NdarrayRef:
    """Stands for ``numpy.ndarray`` where a pickle passes it to ``_reconstruct``. Calling it is refused:
    ``numpy.ndarray(shape, "O", buffer)`` would turn raw bytes into object pointers."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise UnsafePickleError("refused call of numpy.ndarray (arrays are rebuilt by _reconstruct/_frombuffer only)")


_NDARRAY = _NdarrayRef()


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not _NDARRAY:
        raise UnsafePickleError(f"array subtype {subtype!r} is not numpy.ndarray")
    return np.ndarray.__new__(np.ndarray, shape, _plain_dtype(dtype))


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    arr = np.frombuffer(buf, dtype=_plain_dtype(dtype))
    return arr.reshape(shape, order=order if order in ("C", "F") else "C").copy()


def _scalar(dtype: Any, data: Any = None) -> np.generic:
    dt = _plain_dtype(dtype)
    if not isinstance(data, bytes):
        raise UnsafePickleError(f"numpy scalar of {dt} built from {type(data).__name__}, not bytes")
    return np.frombuffer(data, dtype=dt, count=1)[0]


def _encode(text: str, encoding: str = "latin1") -> bytes:
    if not isinstance(text, str) or codecs.lookup(encoding).name not in ("latin-1", "iso8859-1"):
        raise UnsafePickleError(f"_codecs.encode with encoding {encoding!r} (only latin-1 bytes are expected)")
    return text.encode("latin1")


ALLOWED: dict[tuple[str, str], Any] = {
    **{(m, "_reconstruct"): _reconstruct for m in _NUMPY_MODULES},
    **{(m, "scalar"): _scalar for m in _NUMPY_MODULES},
    **{(m, "_frombuffer"): _frombuffer for m in _NUMPY_MODULES},
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _plain_dtype,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): _encode,
}


class ArraysOnlyUnpickler(pickle.Unpickler):
    """Resolves only :data:`ALLOWED` globals (numpy arrays / scalars of plain dtypes and containers)."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"refused global {module}.{name}: a detector checkpoint may hold only numpy "
                                    "arrays of plain dtypes in dicts/lists") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"refused persistent id {pid!r}: not a plain pickle of numpy arrays")


def read_arrays_pickle(path: str | Path, data: bytes | None = None) -> Any:
    """The object in a ``.pkl`` of numpy arrays (or its bytes ``data``), read with :class:`ArraysOnlyUnpickler`
    (never runs its code)."""
    data = Path(path).read_bytes() if data is None else data
    try:
        obj = ArraysOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
        _check_plain(obj, "")
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{path}: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise pickle.UnpicklingError(f"{path}: not a readable pickle of numpy arrays ({e})") from None
    return obj


def _check_plain(obj: Any, where: str) -> None:
    """Every leaf a plain-dtype array / scalar, str, bytes, number, bool or None (names the first that is not)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_plain(k, where)
            _check_plain(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
    elif isinstance(obj, (np.ndarray, np.generic)):
        if obj.dtype.hasobject or obj.dtype.kind not in "biufc":
            raise UnsafePickleError(f"entry {where or 'top level'}: numpy dtype {obj.dtype} is not a plain dtype")
    elif not isinstance(obj, (str, bytes, int, float, complex, type(None), torch.Tensor)):
        raise UnsafePickleError(f"entry {where or 'top level'}: a {type(obj).__name__}, not an array or plain value")


def read_arrays_torch(path: str | Path) -> Any:
    """A torch (zip) file holding numpy arrays and no tensors: its ``data.pkl`` read by :class:`ArraysOnlyUnpickler`."""
    with zipfile.ZipFile(path) as z:
        names = [n for n in z.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(names) != 1:
            raise UnsafePickleError(f"{path}: a zip file without exactly one data.pkl: not a torch checkpoint")
        data = z.read(names[0])
    try:
        return read_arrays_pickle(path, data)
    except UnsafePickleError as e:
        if "persistent id" in str(e) or "global torch." in str(e):
            raise UnsafePickleError(f"{path}: holds torch tensors: if it holds nothing else the workflow reads it "
                                    f"directly (no conversion needed); a mix of tensors and numpy arrays is not "
                                    f"supported") from None
        raise


def convert(src: str | Path, dst: str | Path) -> int:
    """``src`` (.pkl or a torch file of numpy arrays; detectron2 format: arrays at the top level or under
    ``"model"``) → ``dst`` (.pth of tensors, written atomically). Returns the number of arrays. A non-array
    entry of the state dict is refused by name; top-level metadata besides ``"model"`` (``__author__``) is
    dropped."""
    src, dst = Path(src), Path(dst)
    obj = read_arrays_torch(src) if zipfile.is_zipfile(src) else read_arrays_pickle(src)
    state = obj.get("model") if isinstance(obj, dict) and isinstance(obj.get("model"), dict) else obj
    if not isinstance(state, dict):
        raise ValueError(f"{src}: not a state dict (got {type(state).__name__})")
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if isinstance(v, (np.ndarray, np.generic)):
            out[str(k)] = torch.from_numpy(np.array(v, copy=True))
        elif isinstance(v, torch.Tensor):
            out[str(k)] = v
        else:
            raise ValueError(f"{src}: key {k!r} holds a {type(v).__name__}, not an array")
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(dst, {"model": out, "converted_from": src.name, "source_sha256": sha256_file(src)})
    return len(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m itmatch.features.detector.convert",
                                 description="Convert a published detectron2 .pkl checkpoint (numpy arrays only) "
                                             "into a .pth the workflow reads with torch.load(weights_only=True).")
    ap.add_argument("src", help="the downloaded .pkl")
    ap.add_argument("dst", help="the .pth to write (set detector.checkpoints.<dataset> to it)")
    args = ap.parse_args(argv)
    if Path(args.dst).suffix == ".pkl":
        ap.error("the output must not be a .pkl (the workflow refuses those); use .pth")
    try:
        n = convert(args.src, args.dst)
    except (OSError, ValueError, pickle.UnpicklingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.dst}: {n} arrays from {args.src}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
