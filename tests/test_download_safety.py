"""Download safety (issue 21 item 7), against the local test server: no https → http redirect, no spliced
resume without a validator, a cap on files of unknown size, digests pinned in a lock file."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess

import pytest
import requests

from itmatch.config import load_schema
from itmatch.data.acquire import acquire
from itmatch.data.download import (
    DEFAULT_MAX_UNKNOWN_SIZE,
    ChecksumError,
    DownloadError,
    Expected,
    RetryPolicy,
    fetch,
)
from tests.test_download_server import LocalServer, ServerState, make_mini_coco

FAST = RetryPolicy(retries=3, backoff=0.01, backoff_max=0.05, timeout=5)
V1 = os.urandom(300_000)
V2 = os.urandom(300_000)  # same size: only a digest tells them apart


@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (made with the openssl command)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    cert, key = str(d / "cert.pem"), str(d / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_https_to_http_redirect_is_refused(tmp_path, tls_cert):
    plain = ServerState(files={"/f.bin": V1})
    secure = ServerState(files={"/ok.bin": V1})
    session = requests.Session()
    session.trust_env = False  # else REQUESTS_CA_BUNDLE in the environment overrides verify
    session.verify = tls_cert[0]
    with LocalServer(plain, max_seconds=30) as http_base:
        secure.redirects["/f.bin"] = http_base + "/f.bin"
        secure.redirects["/up.bin"] = "/ok.bin"  # relative, stays on https: fine
        with LocalServer(secure, max_seconds=30, tls=tls_cert) as https_base:
            assert https_base.startswith("https://")
            with pytest.raises(DownloadError, match=r"/f.bin: redirected from https to plain http \(http://127"
                                                    r".*/f.bin\); refusing the downgrade"):
                fetch(https_base + "/f.bin", tmp_path / "f.bin", Expected(), FAST, session=session)
            fetch(https_base + "/up.bin", tmp_path / "up.bin", Expected(), FAST, session=session)
    assert plain.log == []  # the plain-http URL was never requested
    assert not (tmp_path / "f.bin").exists() and (tmp_path / "up.bin").read_bytes() == V1
    assert [(p, s) for p, _, s, _ in secure.log] == [("/f.bin", 302), ("/up.bin", 302), ("/ok.bin", 200)]


def test_http_redirects_are_followed_and_bounded(tmp_path):
    state = ServerState(files={"/f.bin": V1}, redirects={"/a": "/b", "/b": "/f.bin", "/loop": "/loop",
                                                         "/ftp": "ftp://127.0.0.1/f.bin"})
    with LocalServer(state, max_seconds=30) as base:
        fetch(base + "/a", tmp_path / "a.bin", Expected(sha256=hashlib.sha256(V1).hexdigest()), FAST)
        with pytest.raises(DownloadError, match=r"more than 10 redirects"):
            fetch(base + "/loop", tmp_path / "loop.bin", Expected(), FAST)
        with pytest.raises(DownloadError, match=r"redirected to ftp://127.0.0.1/f.bin, which is not an http\(s\)"):
            fetch(base + "/ftp", tmp_path / "ftp.bin", Expected(), FAST)
    assert (tmp_path / "a.bin").read_bytes() == V1


def test_no_validator_restarts_instead_of_splicing(tmp_path):
    """No ETag / Last-Modified, connection dropped, file replaced on the server: the old code resumed and
    produced V1[:100000] + V2[100000:], 'verified' for lack of a checksum; now it starts over."""
    state = ServerState(files={"/f.bin": V1}, etag={"/f.bin": None}, drop_after={"/f.bin": 100_000},
                        after_drop={"/f.bin": (V2, None)})
    with LocalServer(state, max_seconds=30) as base:
        fetch(base + "/f.bin", tmp_path / "f.bin", Expected(), FAST)
    assert (tmp_path / "f.bin").read_bytes() == V2
    assert [(r[1], r[2]) for r in state.log] == [(None, 200), (None, 200)]


def test_changed_validator_on_206_restarts(tmp_path):
    """A server that ignores If-Range and answers 206 for a changed file: its new ETag gives it away."""
    state = ServerState(files={"/f.bin": V1}, drop_after={"/f.bin": 100_000}, after_drop={"/f.bin": (V2, '"v2"')},
                        ignore_if_range=True)
    with LocalServer(state, max_seconds=30) as base:
        fetch(base + "/f.bin", tmp_path / "f.bin", Expected(), FAST)
    assert (tmp_path / "f.bin").read_bytes() == V2
    assert [(r[1], r[2]) for r in state.log] == [(None, 200), ("bytes=100000-", 206), (None, 200)]


def test_last_modified_is_a_validator_and_resume_still_works(tmp_path):
    date = "Wed, 21 Oct 2015 07:28:00 GMT"
    state = ServerState(files={"/f.bin": V1}, etag={"/f.bin": 'W/"weak"'}, last_modified={"/f.bin": date},
                        drop_after={"/f.bin": 100_000})
    with LocalServer(state, max_seconds=30) as base:
        fetch(base + "/f.bin", tmp_path / "f.bin", Expected(), FAST)
    assert (tmp_path / "f.bin").read_bytes() == V1
    assert [(r[1], r[2]) for r in state.log] == [(None, 200), ("bytes=100000-", 206)]
    assert state.served("/f.bin") == len(V1)


def test_unknown_size_is_capped(tmp_path):
    small = RetryPolicy(retries=1, backoff=0.01, timeout=5, max_unknown_size=100_000)
    state = ServerState(files={"/nolen.bin": V1, "/len.bin": V1}, no_length={"/nolen.bin"})
    with LocalServer(state, max_seconds=30) as base:
        with pytest.raises(DownloadError, match=r"/nolen.bin: the server sent more than download.max_unknown_size "
                                                r"\(100000 bytes\); set 'size' in its config entry"):
            fetch(base + "/nolen.bin", tmp_path / "nolen.bin", Expected(), small)
        with pytest.raises(DownloadError, match=r"/len.bin: server announces 300000 bytes, more than "
                                                r"download.max_unknown_size \(100000 bytes\)"):
            fetch(base + "/len.bin", tmp_path / "len.bin", Expected(), small)
        # with its size configured, the same file is fine; without Content-Length it is complete at close
        fetch(base + "/len.bin", tmp_path / "len.bin", Expected(size=len(V1)), small)
        fetch(base + "/nolen.bin", tmp_path / "ok.bin", Expected(), FAST)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [
        "len.bin", "len.bin.verified", "ok.bin", "ok.bin.verified"]
    assert (tmp_path / "ok.bin").read_bytes() == V1


def test_schema_default_of_the_cap_is_the_code_default():
    dl = load_schema()["$defs"]["download"]["properties"]
    assert dl["max_unknown_size"]["default"] == DEFAULT_MAX_UNKNOWN_SIZE == 32 * 1024 ** 3


def test_lock_file_records_digest_and_refuses_another_version(tmp_path):
    lock = tmp_path / "downloads.lock.json"
    policy = RetryPolicy(retries=2, backoff=0.01, timeout=5, lock=lock)
    state = ServerState(files={"/f.bin": V1})
    cache = tmp_path / "cache"
    with LocalServer(state, max_seconds=30) as base:
        fetch(base + "/f.bin", cache / "f.bin", Expected(), policy)
        rec = json.loads(lock.read_text())["files"]["f.bin"]
        assert (rec["sha256"], rec["size"], rec["url"]) == (hashlib.sha256(V1).hexdigest(), len(V1), base + "/f.bin")
        fetch(base + "/f.bin", cache / "f.bin", Expected(), policy)  # verified, same digest: fine
        # another machine (empty cache, same lock file), and the server now serves another version
        state.files["/f.bin"] = V2
        other = tmp_path / "other-cache"
        msg = (rf"f.bin \(from {base}/f.bin\): sha256 {hashlib.sha256(V2).hexdigest()}, expected "
               rf"{hashlib.sha256(V1).hexdigest()} as recorded in {lock}")
        with pytest.raises(ChecksumError, match=msg):
            fetch(base + "/f.bin", other / "f.bin", Expected(), policy)
        assert sorted(p.name for p in other.iterdir()) == ["f.bin.lock"]  # nothing kept
        # the cached, verified copy is checked against the lock too (a tampered lock or a swapped file)
        data = json.loads(lock.read_text())
        data["files"]["f.bin"]["sha256"] = "0" * 64
        lock.write_text(json.dumps(data))
        with pytest.raises(ChecksumError, match=r"f.bin .*: sha256 [0-9a-f]{64}, expected 0{64} as recorded"):
            fetch(base + "/f.bin", cache / "f.bin", Expected(), policy)
    assert json.loads(lock.read_text())["files"]["f.bin"]["sha256"] == "0" * 64  # never rewritten silently


def test_acquire_records_every_download_in_the_cache_lock(tmp_path):
    files = make_mini_coco(tmp_path / "src")
    state = ServerState(files={f"/{k}": v for k, v in files.items()})
    res = tmp_path / "resources"
    with LocalServer(state, max_seconds=60) as base:
        spec = {"cache": str(res / "downloads"), "retries": 2, "backoff": 0.01, "timeout": 5,
                "json": {"url": f"{base}/caption_datasets.zip", "member": "dataset_coco.json"},
                "images": [{"url": f"{base}/train2014.zip"}, {"url": f"{base}/val2014.zip"}]}
        acquire("coco", spec, res / "coco/dataset_coco.json", res / "coco/images", res / "coco/.verified",
                res / "coco/bad_images.txt")
    pinned = json.loads((res / "downloads.lock.json").read_text())["files"]
    assert {k: v["sha256"] for k, v in pinned.items()} == {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}
