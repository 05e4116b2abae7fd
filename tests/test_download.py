"""Downloads (resume, retry, verification), safe extraction and image checks, against a local server."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import zipfile

import pytest

from itmatch.data.archives import ArchiveError, extract, extract_member, extract_to
from itmatch.data.download import ChecksumError, DownloadError, Expected, RetryPolicy, fetch
from itmatch.data.image_check import BadImagesError, check_images, read_report
from tests.test_download_server import LocalServer, ServerState, make_mini_coco

FAST = RetryPolicy(retries=3, backoff=0.01, backoff_max=0.05, timeout=5)
DATA = os.urandom(300_000)
SHA = hashlib.sha256(DATA).hexdigest()


def _state(**kw) -> ServerState:
    return ServerState(files={"/data/f.bin": DATA}, **kw)


def test_full_download_verifies_and_is_not_fetched_again(tmp_path):
    state = _state()
    dest = tmp_path / "cache" / "f.bin"
    with LocalServer(state, max_seconds=30) as base:
        fetch(base + "/data/f.bin", dest, Expected(size=len(DATA), sha256=SHA), FAST)
        assert dest.read_bytes() == DATA
        fetch(base + "/data/f.bin", dest, Expected(size=len(DATA), sha256=SHA), FAST)  # verified: no request
    assert len(state.log) == 1
    assert not (tmp_path / "cache" / "f.bin.part").exists()
    assert json.loads((tmp_path / "cache" / "f.bin.verified").read_text())["sha256"] == SHA


def test_dropped_connection_resumes_from_the_byte_where_it_stopped(tmp_path):
    state = _state(drop_after={"/data/f.bin": 123_456})
    dest = tmp_path / "f.bin"
    with LocalServer(state, max_seconds=30) as base:
        fetch(base + "/data/f.bin", dest, Expected(size=len(DATA), sha256=SHA), FAST)
    assert dest.read_bytes() == DATA
    reqs = state.requests("/data/f.bin")
    assert [(r[1], r[2]) for r in reqs] == [(None, 200), ("bytes=123456-", 206)]
    assert state.served("/data/f.bin") == len(DATA)  # every byte once, not the file twice


def test_resume_after_killed_job_uses_the_part_file(tmp_path):
    (tmp_path / "f.bin.part").write_bytes(DATA[:200_000])
    (tmp_path / "f.bin.part.json").write_text(json.dumps({"url": None}))
    state = _state()
    with LocalServer(state, max_seconds=30) as base:
        url = base + "/data/f.bin"
        (tmp_path / "f.bin.part.json").write_text(json.dumps({"url": url, "validator": '"v1"'}))
        fetch(url, tmp_path / "f.bin", Expected(sha256=SHA), FAST)
    assert (tmp_path / "f.bin").read_bytes() == DATA
    assert [r[1] for r in state.log] == ["bytes=200000-"]
    assert state.served("/data/f.bin") == 100_000


def test_server_ignoring_range_restarts_cleanly(tmp_path):
    state = _state(drop_after={"/data/f.bin": 50_000}, ignore_range=True)
    dest = tmp_path / "f.bin"
    with LocalServer(state, max_seconds=30) as base:
        fetch(base + "/data/f.bin", dest, Expected(size=len(DATA), sha256=SHA), FAST)
    assert dest.read_bytes() == DATA
    assert [(r[1], r[2]) for r in state.log] == [(None, 200), ("bytes=50000-", 200)]


def test_5xx_is_retried_with_backoff(tmp_path):
    state = _state(fail_503={"/data/f.bin": 2})
    with LocalServer(state, max_seconds=30) as base:
        fetch(base + "/data/f.bin", tmp_path / "f.bin", Expected(sha256=SHA), FAST)
    assert [r[2] for r in state.log] == [503, 503, 200]


def test_gives_up_after_retries_and_404_fails_at_once(tmp_path):
    state = _state(fail_503={"/data/f.bin": 10})
    with LocalServer(state, max_seconds=30) as base:
        with pytest.raises(DownloadError, match=r"giving up after 3 retries.*HTTP 503"):
            fetch(base + "/data/f.bin", tmp_path / "f.bin", Expected(), FAST)
        with pytest.raises(DownloadError, match=r"/nope.bin: HTTP 404"):
            fetch(base + "/nope.bin", tmp_path / "nope.bin", Expected(), FAST)
    assert [r[2] for r in state.log] == [503] * 4 + [404]


def test_corrupted_byte_fails_the_checksum_and_leaves_no_file(tmp_path):
    bad = bytearray(DATA)
    bad[1234] ^= 0xFF
    state = ServerState(files={"/data/f.bin": bytes(bad)})
    with LocalServer(state, max_seconds=30) as base:
        with pytest.raises(ChecksumError, match=rf"sha256 [0-9a-f]{{64}}, expected {SHA}"):
            fetch(base + "/data/f.bin", tmp_path / "f.bin", Expected(size=len(DATA), sha256=SHA), FAST)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin.lock"]  # no final file, no part file


def test_wrong_size_reported_by_server_fails_before_download(tmp_path):
    state = _state()
    with LocalServer(state, max_seconds=30) as base:
        with pytest.raises(ChecksumError, match=r"server reports 300000 bytes, expected 299999"):
            fetch(base + "/data/f.bin", tmp_path / "f.bin", Expected(size=299_999), FAST)
    assert not (tmp_path / "f.bin").exists()


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_zip_with_parent_member_is_refused(tmp_path):
    (tmp_path / "evil.zip").write_bytes(_zip({"ok/a.txt": b"a", "../escaped.txt": b"x"}))
    with pytest.raises(ArchiveError, match=r"evil.zip: member '\.\./escaped.txt' points outside"):
        extract_to([(tmp_path / "evil.zip", None)], tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["evil.zip"]  # no partial or temporary folder


def test_absolute_member_and_escaping_symlink_are_refused(tmp_path):
    (tmp_path / "abs.zip").write_bytes(_zip({"/etc/passwd": b"x"}))
    with pytest.raises(ArchiveError, match="absolute path"):
        extract(tmp_path / "abs.zip", tmp_path)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        info = tarfile.TarInfo("imgs/link")
        info.type, info.linkname = tarfile.SYMTYPE, "../../outside"
        tf.addfile(info)
    (tmp_path / "link.tar.gz").write_bytes(buf.getvalue())
    with pytest.raises(ArchiveError, match=r"link.tar.gz: member 'imgs/link' is a link to '\.\./\.\./outside'"):
        extract_to([(tmp_path / "link.tar.gz", None)], tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_truncated_archive_fails_clearly_without_partial_folder(tmp_path, kind):
    members = {f"imgs/{i}.bin": os.urandom(50_000) for i in range(4)}
    if kind == "zip":
        data = _zip(members)
    else:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tf:
            for name, d in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(d)
                tf.addfile(info, io.BytesIO(d))
        data = buf.getvalue()
    path = tmp_path / f"cut.{kind}"
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ArchiveError, match=rf"cut.{kind}: truncated or corrupt"):
        extract_to([(path, None)], tmp_path / "images")
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_folder_entries_after_their_files_are_fine(tmp_path):
    (tmp_path / "a.zip").write_bytes(_zip({"d/x.txt": b"x", "d/": b""}))
    assert extract_to([(tmp_path / "a.zip", None)], tmp_path / "out") == 1
    (tmp_path / "b.zip").write_bytes(_zip({"d/x.txt": b"other"}))
    with pytest.raises(ArchiveError, match=r"b.zip: member 'd/x.txt' would overwrite"):
        extract_to([(tmp_path / "a.zip", None), (tmp_path / "b.zip", None)], tmp_path / "out2")


def test_root_strips_the_top_folder_and_member_extracts_one_file(tmp_path):
    (tmp_path / "a.zip").write_bytes(_zip({"flickr30k-images/1.jpg": b"1", "flickr30k-images/2.jpg": b"2",
                                           "readme.txt": b"r"}))
    assert extract_to([(tmp_path / "a.zip", "flickr30k-images")], tmp_path / "images") == 2
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["1.jpg", "2.jpg"]
    extract_member(tmp_path / "a.zip", "readme.txt", tmp_path / "r.txt")
    assert (tmp_path / "r.txt").read_bytes() == b"r"
    with pytest.raises(ArchiveError, match="no member.*missing.txt"):
        extract_member(tmp_path / "a.zip", "missing.txt", tmp_path / "m.txt")
    assert not (tmp_path / "m.txt").exists()


def test_corrupt_jpeg_is_reported_by_name_and_odd_modes_pass(tmp_path):
    bad = "COCO_val2014_000000001005.jpg"
    files = make_mini_coco(tmp_path, corrupt=bad)
    for name in ("train2014.zip", "val2014.zip"):
        (tmp_path / name).write_bytes(files[name])
    extract_to([(tmp_path / "train2014.zip", None), (tmp_path / "val2014.zip", None)], tmp_path / "images")
    (tmp_path / "captions.zip").write_bytes(files["caption_datasets.zip"])
    extract_member(tmp_path / "captions.zip", "dataset_coco.json", tmp_path / "dataset_coco.json")
    report = tmp_path / "bad_images.txt"
    with pytest.raises(BadImagesError, match=rf"1 of 6 images .* cannot be decoded.*\n  val2014/{bad}: cannot decode"):
        check_images(tmp_path / "dataset_coco.json", tmp_path / "images", report)
    assert list(read_report(report)) == [f"val2014/{bad}"]
    # grayscale, CMYK, palette and RGBA images are fine; with drop the bad one is only listed
    assert list(check_images(tmp_path / "dataset_coco.json", tmp_path / "images", report, on_bad="drop")) == [
        f"val2014/{bad}"]
    (tmp_path / "images" / "train2014" / "COCO_train2014_000000001000.jpg").unlink()
    bad_now = check_images(tmp_path / "dataset_coco.json", tmp_path / "images", report, on_bad="drop")
    assert bad_now["train2014/COCO_train2014_000000001000.jpg"] == "missing image file"
