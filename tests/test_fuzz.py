"""Fuzz tests (Hypothesis, bounded): the only acceptable outcomes are success or our named error.

* ingest: mutations of a valid Karpathy JSON (types, missing keys, duplicates, paths, unicode, raw bytes)
  → a valid ingest (every file inside the image folder, 5 captions per image, unique ids) or IngestError;
* config: a typo in a key at every nesting level the schema defines → ConfigError naming that key;
* archives: random member names, kinds and link targets (tar and zip) → ArchiveError or an extraction
  that wrote nothing outside its folder, left no link pointing outside it and copied no host file.

Example counts are fixed (``max_examples``, ``deadline=None``, derandomized so CI runs are repeatable);
``CASES`` counts the examples each test really ran and the tests check they ran.
"""

from __future__ import annotations

import copy
import io
import json
import os
import stat
import tarfile
import tempfile
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from itmatch.config import ConfigError, load_config, load_schema, validate_config
from itmatch.data.archives import ArchiveError, extract_to
from itmatch.data.ingest import IngestError, IngestOptions, ingest
from tests.conftest import REPO, TEST_CONFIG

CASES: Counter = Counter()
FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
N_INGEST, N_INGEST_BYTES, N_CONFIG, N_TAR, N_ZIP = 250, 150, 300, 300, 150


# --- ingest --------------------------------------------------------------------------------------------

SPLITS = ["train", "val", "test", "restval"]


def _base_doc() -> dict[str, Any]:
    images = []
    for i in range(4):
        sents = [{"raw": f"A photo {i} caption {k}.", "sentid": 10 * i + k, "imgid": i, "tokens": ["a", "photo"]}
                 for k in range(5)]
        images.append({"filepath": "imgs", "filename": f"{i}.jpg", "imgid": i, "cocoid": 100 + i,
                       "split": SPLITS[i], "sentences": sents})
    return {"dataset": "coco", "images": images}


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz_images")
    (root / "imgs").mkdir()
    for i in range(4):
        Image.new("RGB", (8 + i, 8), (40 * i, 0, 0)).save(root / "imgs" / f"{i}.jpg")
    (root / "imgs" / "not-an-image.jpg").write_bytes(b"plain text")
    return root


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6)
    | st.sampled_from(["\ud800", "train", "restval", "0.jpg", "imgs", ""]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6)
path_text = st.lists(st.sampled_from(["..", ".", "", "imgs", "0.jpg", "1.jpg", "/", "~", "é", "a b", "..\\x",
                                      "not-an-image.jpg", "\x00", "C:"]), min_size=1, max_size=5).map("/".join)
any_text = st.text(max_size=12) | st.sampled_from(["\ud800x", "\u202e", "\ufeff", "😀", "\n", " "])


def _slots(node: Any, out: list) -> list:
    """Every (container, key) pair in a JSON document."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for k, v in list(items):
        out.append((node, k))
        _slots(v, out)
    return out


def _mutate(doc: dict[str, Any], data: st.DataObject) -> dict[str, Any]:
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        op = data.draw(st.sampled_from(["set", "delete", "duplicate", "path", "text", "top"]), label="op")
        if op == "top":
            return data.draw(st.sampled_from([[], {"images": {}}, {"images": None}, {"images": [1, "x"]}, {}]))
        if op == "path" and isinstance(doc.get("images"), list) and doc["images"]:
            entry = data.draw(st.sampled_from(doc["images"]))
            if isinstance(entry, dict):
                entry[data.draw(st.sampled_from(["filename", "filepath"]))] = data.draw(path_text, label="path")
            continue
        slots = _slots(doc, [])
        if not slots:
            return doc
        node, key = data.draw(st.sampled_from(slots), label="slot")
        if op == "set":
            node[key] = data.draw(json_values, label="value")
        elif op == "delete":
            del node[key]
        elif op == "duplicate" and isinstance(node, list):
            node.insert(key, copy.deepcopy(node[key]))
        elif op == "text" and isinstance(node[key], str):
            node[key] = data.draw(any_text, label="text")
    return doc


def _check_ingest(json_bytes: bytes, image_root: Path, options: IngestOptions) -> str:
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        path = Path(tmp) / "dataset.json"
        path.write_bytes(json_bytes)
        try:
            images, captions = ingest(path, image_root, Path(tmp) / "i.parquet", Path(tmp) / "c.parquet", options)
        except IngestError as e:
            assert str(path) in str(e) or "unusable image" in str(e), e  # names the file (or lists the images)
            return "error"
    root = image_root.resolve()
    assert all((root / f).resolve().is_relative_to(root) for f in images["file"])
    assert images["image_id"].is_unique
    assert len(captions) == options.captions_per_image * len(images)
    return "ok"


options_strategy = st.builds(IngestOptions, on_bad_caption_count=st.sampled_from(["error", "drop"]),
                             truncate_extra_captions=st.booleans(), restval_as_train=st.booleans(),
                             verify_images=st.just("header"), on_bad_image=st.sampled_from(["error", "drop"]))


@settings(FUZZ, max_examples=N_INGEST)
@given(data=st.data(), options=options_strategy)
def test_fuzz_ingest_json_mutations(image_root, data, options):
    doc = _mutate(_base_doc(), data)
    text = json.dumps(doc, ensure_ascii=data.draw(st.booleans()))
    CASES[f"ingest:{_check_ingest(text.encode('utf-8', 'surrogatepass'), image_root, options)}"] += 1


@settings(FUZZ, max_examples=N_INGEST_BYTES)
@given(data=st.data())
def test_fuzz_ingest_raw_bytes(image_root, data):
    raw = bytearray(json.dumps(_base_doc(), ensure_ascii=False).encode())
    for _ in range(data.draw(st.integers(1, 3))):
        op = data.draw(st.sampled_from(["cut", "flip", "insert"]))
        pos = data.draw(st.integers(0, len(raw) - 1))
        if op == "cut":
            raw = raw[:pos]
            if not raw:
                break
        elif op == "flip":
            raw[pos] = data.draw(st.integers(0, 255))
        else:
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=4))
    CASES[f"ingest-bytes:{_check_ingest(bytes(raw), image_root, IngestOptions(verify_images='header'))}"] += 1


# --- config --------------------------------------------------------------------------------------------

SCHEMA = load_schema()
BASE_CONFIG = load_config(REPO / "config" / "config.yaml", [TEST_CONFIG])


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    """A schema node with ``$ref`` followed and ``allOf`` parts merged (their properties joined); a per-dataset map
    (``x-keys: datasets``) gets the configured datasets as its properties."""
    props: dict[str, Any] = {}
    while "$ref" in node:
        props.update(node.get("properties", {}))
        target: Any = SCHEMA
        for part in node["$ref"][2:].split("/"):
            target = target[part]
        node = {**target, **{k: v for k, v in node.items() if k not in ("$ref", "properties")}}
    props = {**node.get("properties", {}), **props}
    for part in node.get("allOf", []):
        props.update(_resolve(part).get("properties", {}))
    if node.get("x-keys") == "datasets" and isinstance(node.get("additionalProperties"), dict):
        props.update(dict.fromkeys(BASE_CONFIG["datasets"], node["additionalProperties"]))
    return {**node, "properties": props} if props else node


def _object_paths(node: dict[str, Any], path: tuple = ()) -> list[tuple[tuple, list[str]]]:
    """(path, property names) of every object the schema defines, nested ones included; a list's item is ``0``."""
    node = _resolve(node)
    out = []
    if node.get("properties"):
        out.append((path, sorted(node["properties"])))
        for k, child in node["properties"].items():
            out += _object_paths(child, (*path, k))
    if isinstance(node.get("items"), dict):
        out += _object_paths(node["items"], (*path, 0))
    return out


# (the top-level ``datasets`` map is open: any new name there declares a dataset of your own)
OBJECT_PATHS = [(p, k) for p, k in _object_paths(SCHEMA) if p != ("datasets",)]
ALL_KEYS = {k for _, keys in OBJECT_PATHS for k in keys}


def _typo(key: str, data: st.DataObject) -> str:
    op = data.draw(st.sampled_from(["insert", "delete", "replace", "swap", "case", "suffix"]))
    i = data.draw(st.integers(0, max(len(key) - 1, 0)))
    ch = data.draw(st.sampled_from("abcdefghijklmnopqrstuvwxyz_0123456789"))
    if op == "insert":
        return key[:i] + ch + key[i:]
    if op == "delete" and len(key) > 1:
        return key[:i] + key[i + 1:]
    if op == "replace":
        return key[:i] + ch + key[i + 1:]
    if op == "swap" and len(key) > 1:
        i = min(i, len(key) - 2)
        return key[:i] + key[i + 1] + key[i] + key[i + 2:]
    if op == "case":
        return key.swapcase()
    return key + "s"


def _node_at(cfg: dict[str, Any], path: tuple) -> dict[str, Any]:
    """The mapping at ``path`` in ``cfg``, created (as an empty mapping / one-item list) where missing."""
    node: Any = cfg
    for k in path:
        if isinstance(k, int):
            if not node:
                node.append({})
            node = node[k]
            continue
        nxt = node.get(k)
        follow_is_list = path.index(k) + 1 < len(path) and isinstance(path[path.index(k) + 1], int)
        if not isinstance(nxt, (dict, list)):
            node[k] = nxt = [] if follow_is_list else {}
        node = nxt
    return node


def _valid_dataset_value(cfg: dict[str, Any], path: tuple) -> Any:
    """A value the per-dataset map at ``path`` accepts under a configured name (its entry there, else ``{}`` or
    None, whichever validates), so that only the name itself is wrong."""
    node = _node_at(cfg, path)
    if node:
        return copy.deepcopy(next(iter(node.values())))
    for value in ({}, None):
        trial = copy.deepcopy(cfg)
        _node_at(trial, path)["shapes"] = value
        try:
            validate_config(trial, SCHEMA)
            return value
        except ConfigError:
            continue
    return {}


@settings(FUZZ, max_examples=N_CONFIG)
@given(data=st.data())
def test_fuzz_config_key_typos_at_every_level(data):
    path, keys = data.draw(st.sampled_from(OBJECT_PATHS), label="object")
    cfg = copy.deepcopy(BASE_CONFIG)
    node = _node_at(cfg, path)
    key = data.draw(st.sampled_from(keys), label="key")
    bad = _typo(key, data)
    assume(bad not in ALL_KEYS)
    if key in node and data.draw(st.booleans(), label="rename"):
        node[bad] = node.pop(key)
    elif keys == sorted(BASE_CONFIG["datasets"]):  # a per-dataset map: a value valid under a real name
        node[bad] = _valid_dataset_value(cfg, path)
    else:
        node[bad] = data.draw(st.sampled_from([1, "x", None, {}, [1]]))
    dotted = ".".join(map(str, (*path, bad)))
    with pytest.raises(ConfigError) as err:
        validate_config(cfg, SCHEMA)
    assert f"config key {dotted}: unknown; allowed keys here: {', '.join(keys)}" in str(err.value)
    CASES[f"config:{len(path)}"] += 1


def test_config_fuzz_reaches_every_level():
    depths = Counter(len(p) for p, _ in OBJECT_PATHS)
    assert max(depths) >= 5 and len(OBJECT_PATHS) > 80  # e.g. training.models.scan.datasets.coco
    assert any(p == ("models", "caan", "datasets", "shapes") for p, _ in OBJECT_PATHS)
    assert any(p == ("detector", "per_dataset", "shapes", "input") for p, _ in OBJECT_PATHS)


# --- archives --------------------------------------------------------------------------------------------

HOST = b"HOST-FILE-7f3a9c: must never appear inside the extraction folder"
# plain pieces are repeated so that about a third of the archives are valid and get extracted
names = st.lists(st.sampled_from(["a", "b", "c.txt"] * 4 + ["..", ".", "", "é", "a b", "\\", "host.txt", "out",
                                                              "x" * 300]),
                 min_size=1, max_size=6).map("/".join)
link_targets = names | st.sampled_from(["/", "/etc/hostname", "../host.txt", "../../host.txt", "../../../../..",
                                        ".", "a/../.."])
members = st.lists(st.tuples(names, st.sampled_from(["file", "dir", "sym", "hard"]), link_targets,
                             st.binary(max_size=8)), min_size=1, max_size=8)


def _sandbox(tmp: Path) -> tuple[Path, Path]:
    """``tmp/box/host.txt`` (a host file) and the extraction target ``tmp/box/l1/l2/out``."""
    box = tmp / "box"
    (box / "l1" / "l2").mkdir(parents=True)
    (box / "host.txt").write_bytes(HOST)
    (box / "l1" / "host.txt").write_bytes(HOST)
    return box, box / "l1" / "l2" / "out"


def _snapshot(box: Path, out: Path) -> dict[str, tuple]:
    snap = {}
    for dirpath, dirnames, filenames in os.walk(box, followlinks=False):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            if p == out or out in p.parents or p.name.endswith((".tar", ".zip")) or p.name.startswith("out."):
                continue
            st_ = p.lstat()
            snap[str(p)] = (stat.S_IFMT(st_.st_mode), st_.st_size, st_.st_ino,
                            p.read_bytes() if stat.S_ISREG(st_.st_mode) else None)
    return snap


def _resolve(path: str) -> str | None:
    """Where an absolute path really leads, following every link component by component (missing parts
    kept as they are); None for a link loop (which leads nowhere). ``os.path.realpath`` of Python 3.11
    returns a wrong path for loops, so it is not used here."""
    rest, cur, hops = path.split("/"), "/", 0
    while rest:
        part = rest.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            cur = os.path.dirname(cur)
            continue
        nxt = os.path.join(cur, part)
        if os.path.islink(nxt):
            hops += 1
            if hops > 100:
                return None
            target = os.readlink(nxt)
            cur = "/" if target.startswith("/") else cur
            rest = target.split("/") + rest
        else:
            cur = nxt
    return cur


def _check_extracted(box: Path, out: Path, before: dict[str, tuple]) -> None:
    assert _snapshot(box, out) == before  # nothing outside the folder created, changed or removed
    host_inodes = {os.stat(box / "host.txt").st_ino, os.stat(box / "l1" / "host.txt").st_ino}
    real_out = os.path.realpath(out)
    for dirpath, dirnames, filenames in os.walk(out, followlinks=False):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st_ = os.lstat(p)
            if stat.S_ISLNK(st_.st_mode):
                target = _resolve(os.path.abspath(p))
                assert target is None or os.path.commonpath([target, real_out]) == real_out, (p, os.readlink(p))
            elif stat.S_ISREG(st_.st_mode):
                assert st_.st_ino not in host_inodes
                with open(p, "rb") as fh:
                    assert HOST not in fh.read()
    assert not any(p.name.startswith("out.") for p in out.parent.iterdir())  # no temporary folder left


def _extract_and_check(archive_bytes: bytes, suffix: str) -> str:
    with tempfile.TemporaryDirectory(dir="/tmp") as t:
        box, out = _sandbox(Path(t))
        arc = box / f"a{suffix}"
        arc.write_bytes(archive_bytes)
        before = _snapshot(box, out)
        try:
            extract_to([(arc, None)], out)
            outcome = "ok"
        except ArchiveError as e:
            assert str(arc) in str(e), e
            assert not out.exists()
            reasons = ["('..')", "outside the extraction folder", "absolute", "hard link", "would overwrite",
                       "needs the folder", "longer than", "symbolic link", "device", "no files"]
            outcome = "refused:" + next((r for r in reasons if r in str(e)), "other")
        _check_extracted(box, out, before)
    return outcome


@settings(FUZZ, max_examples=N_TAR)
@given(ms=members)
def test_fuzz_tar_members_and_links(ms):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, target, payload in ms:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE}[kind]
            info.linkname = target if kind != "dir" else ""
            tf.addfile(info)
    CASES[f"tar:{_extract_and_check(buf.getvalue(), '.tar')}"] += 1


@settings(FUZZ, max_examples=N_ZIP)
@given(ms=members)
def test_fuzz_zip_members_and_links(ms):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        seen = set()
        for name, kind, target, payload in ms:
            if name in seen:
                continue
            seen.add(name)
            info = zipfile.ZipInfo(name + ("/" if kind == "dir" and not name.endswith("/") else ""))
            if kind in ("sym", "hard"):
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
                zf.writestr(info, target)
            else:
                zf.writestr(info, b"" if kind == "dir" else payload)
    CASES[f"zip:{_extract_and_check(buf.getvalue(), '.zip')}"] += 1


def test_fuzz_case_counts():
    """Runs after the fuzz tests (file order): each fuzz test that ran tried (nearly) all its examples and saw
    both outcomes where both exist (the counts are in docs/reliability.md)."""
    print("fuzz cases:", dict(sorted(CASES.items())))
    ran = {k.split(":")[0] for k in CASES}
    if not ran:
        pytest.skip("run together with the fuzz tests above")
    expected = {"ingest": N_INGEST, "ingest-bytes": N_INGEST_BYTES, "config": N_CONFIG, "tar": N_TAR, "zip": N_ZIP}
    for kind in ran:
        total = sum(v for k, v in CASES.items() if k.split(":")[0] == kind)
        assert total >= expected[kind] * (0.5 if kind == "config" else 0.9), (kind, total)  # config: assume()
    for kind, ok, bad in (("ingest", "ok", "error"), ("tar", "ok", None), ("zip", "ok", None)):
        if kind in ran:
            assert CASES[f"{kind}:{ok}"] > 0 and (bad is None or CASES[f"{kind}:{bad}"] > 0), kind
