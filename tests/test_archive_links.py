"""Archive extraction cannot escape through link chains (issue 21 item 3): tar members go through the
standard library's 'data' filter, zip links are refused, hard links never copy a host file."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from itmatch.data.archives import ArchiveError, extract, extract_to

HOST_FILE = Path("/etc/hostname")


def _tar(path: Path, members: list[tuple[str, str, str | bytes]]) -> Path:
    """``members``: (name, kind, payload) with kind file (payload bytes), sym / hard (payload: link target)."""
    with tarfile.open(path, "w:gz") as tf:
        for name, kind, payload in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
            else:
                info.type = tarfile.SYMTYPE if kind == "sym" else tarfile.LNKTYPE
                info.linkname = payload
                tf.addfile(info)
    return path


def _inside(root: Path) -> list[Path]:
    """Everything under ``root`` (links not followed)."""
    return sorted(root.rglob("*"))


def test_issue_link_chain_is_refused_and_writes_nothing(tmp_path):
    """a -> ., then a/a/a/b -> ../../.. (passes a textual depth count: 3 folders down, 3 up)."""
    arc = _tar(tmp_path / "chain.tar.gz", [("a", "sym", "."), ("a/a/a/b", "sym", "../../.."),
                                           ("a/a/a/b/c.txt", "file", b"x")])
    before = set(tmp_path.parent.iterdir())
    with pytest.raises(ArchiveError, match=r"chain.tar.gz: member 'a/a/a/b' is a link to '\.\./\.\./\.\.', "
                                           r"outside the extraction folder"):
        extract_to([(arc, None)], tmp_path / "images")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chain.tar.gz"]  # no folder, no temporary folder
    assert set(tmp_path.parent.iterdir()) == before


def test_deep_chain_with_hard_link_to_a_host_file_copies_nothing(tmp_path):
    """The same chain deep enough to reach '/', then a hard link through it to /etc/hostname (the old
    textual check accepted both and copied the host file into the dataset)."""
    dest = tmp_path / "images"
    n = len(dest.parts) + 2
    host = HOST_FILE if HOST_FILE.is_file() else tmp_path / "host.txt"
    if host == tmp_path / "host.txt":
        host.write_text("host secret")
    chain = "/".join(["a"] * n)
    arc = _tar(tmp_path / "deep.tar", [("a", "sym", "."), (f"{chain}/b", "sym", "/".join([".."] * n)),
                                       ("h", "hard", f"{chain}/b/{str(host).lstrip('/')}")])
    with pytest.raises(ArchiveError, match=rf"deep.tar: member '{chain}/b' is a link to '(\.\./)+\.\.', outside"):
        extract_to([(arc, None)], dest)
    assert not dest.exists()
    # without the escaping link: the hard link names nothing extracted before it and is refused too
    arc2 = _tar(tmp_path / "hard.tar", [("a", "sym", "."), ("h", "hard", f"{chain}/{host.name}")])
    out = tmp_path / "out2"
    out.mkdir()
    with pytest.raises(ArchiveError, match=r"hard.tar: member 'h' is a hard link to .*not a regular file extracted "
                                           r"before it"):
        extract(arc2, out)
    assert not (out / "h").exists()
    assert all(p.is_symlink() or host.read_bytes() != p.read_bytes() for p in _inside(out) if p.is_file())


def test_links_inside_the_folder_still_work(tmp_path):
    arc = _tar(tmp_path / "ok.tar.gz", [("imgs/1.jpg", "file", b"one"), ("imgs/same.jpg", "hard", "imgs/1.jpg"),
                                        ("imgs/alias.jpg", "sym", "1.jpg"), ("top", "sym", "imgs")])
    assert extract_to([(arc, None)], tmp_path / "images") == 4
    images = tmp_path / "images"
    assert (images / "imgs" / "same.jpg").read_bytes() == b"one"
    assert (images / "imgs" / "alias.jpg").is_symlink() and (images / "imgs" / "alias.jpg").read_bytes() == b"one"
    assert (images / "top" / "1.jpg").read_bytes() == b"one"
    # with root, a link to outside the root folder is outside the image folder
    arc2 = _tar(tmp_path / "root.tar", [("top/1.jpg", "file", b"1"), ("top/up", "sym", "../other"),
                                        ("other/2.jpg", "file", b"2")])
    with pytest.raises(ArchiveError, match=r"root.tar: member 'top/up' is a link to '\.\./other', outside"):
        extract_to([(arc2, "top")], tmp_path / "images2")


def test_write_through_an_extracted_link_is_refused(tmp_path):
    """A file member whose path runs through a symlink made by an earlier archive member."""
    outside = tmp_path / "outside"
    outside.mkdir()
    arc = _tar(tmp_path / "w.tar", [("d", "sym", "."), ("d/d/x.txt", "file", b"x")])
    assert extract_to([(arc, None)], tmp_path / "images") == 2  # lands inside: images/x.txt
    assert (tmp_path / "images" / "x.txt").read_bytes() == b"x"
    assert list(outside.iterdir()) == []


def test_device_member_is_refused(tmp_path):
    with tarfile.open(tmp_path / "dev.tar", "w") as tf:
        info = tarfile.TarInfo("imgs/null")
        info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
        tf.addfile(info)
    with pytest.raises(ArchiveError, match=r"dev.tar: member 'imgs/null' is a device or FIFO"):
        extract_to([(tmp_path / "dev.tar", None)], tmp_path / "images")


def test_zip_links_are_refused(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("imgs/1.jpg", b"1")
        info = zipfile.ZipInfo("imgs/link")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, ".")
    (tmp_path / "l.zip").write_bytes(buf.getvalue())
    with pytest.raises(ArchiveError, match=r"l.zip: member 'imgs/link' is a symbolic link; links in zip archives "
                                           r"are not extracted"):
        extract_to([(tmp_path / "l.zip", None)], tmp_path / "images")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.zip"]


def test_zip_member_through_a_link_from_an_earlier_tar_is_refused(tmp_path):
    """Two archives into one folder: the tar's (inside) link cannot carry a later zip member elsewhere."""
    outside = tmp_path / "outside"
    outside.mkdir()
    arc = _tar(tmp_path / "a.tar", [("imgs/1.jpg", "file", b"1"), ("imgs/here", "sym", ".")])
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("imgs/here/1.jpg", b"overwrite")
    (tmp_path / "b.zip").write_bytes(buf.getvalue())
    with pytest.raises(ArchiveError, match=r"b.zip: member 'imgs/here/1.jpg' would overwrite"):
        extract_to([(arc, None), (tmp_path / "b.zip", None)], tmp_path / "images")
    assert not (tmp_path / "images").exists() and list(outside.iterdir()) == []


def test_folder_sources_are_linked_entry_by_entry_never_copied(tmp_path):
    """Two unpacked folders: each entry is linked by its own path; a link inside the user's folder is not
    resolved (the new link points at the user's entry, not at what it points to) and nothing is copied."""
    from itmatch.data.acquire import acquire_images
    from itmatch.data.download import RetryPolicy

    secret = tmp_path / "elsewhere"
    secret.mkdir()
    (secret / "s.jpg").write_bytes(b"s")
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "train").mkdir(parents=True)
    (a / "train" / "1.jpg").write_bytes(b"1")
    (a / "more").symlink_to(secret)
    (b / "val").mkdir(parents=True)
    out = tmp_path / "images"
    acquire_images([{"url": str(a)}, {"url": str(b)}], out, tmp_path / "cache", RetryPolicy(), "k")
    entries = {p.name: p for p in out.iterdir()}
    assert sorted(entries) == ["more", "train", "val"]
    assert all(p.is_symlink() for p in entries.values())  # nothing copied
    assert os.readlink(entries["more"]) == str(a / "more")  # the user's entry, not its target
    assert os.readlink(entries["train"]) == str(a / "train")
