"""Safe extraction of ``.zip`` and ``.tar[.gz|.bz2|.xz]`` archives.

Every member is checked before it is written: no absolute path, no ``..`` component, nothing written
through a link to outside the extraction folder, no device / FIFO entries. Tar members go through the
standard library's ``'data'`` extraction filter (PEP 706), which resolves each link target against what
is already on disk (so a chain such as ``a -> .`` then ``a/a/a/b -> ../../..`` is caught), and are
written by :mod:`tarfile` itself; a hard link must name a regular file extracted before it (it is linked,
never copied through a symlink). Zip archives may not contain links at all (image archives never need
them). An offending member stops the extraction with :class:`ArchiveError` naming the archive and the
member. A truncated or corrupt
archive (missing central directory, bad CRC, early end of a compressed stream) is also an
:class:`ArchiveError`. :func:`extract_to` extracts into a temporary sibling folder and renames it only
when everything was written, so a failure never leaves a partial folder under the final name.
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from itmatch.utils.io import atomic_path
from itmatch.utils.logs import log, progress

MAX_NAME = 1024  # longest member name / link target accepted (characters); real datasets use < 100
NAME_MAX = 255  # longest file name (bytes) on Linux file systems
TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


class ArchiveError(ValueError):
    """An archive is unsafe, truncated or corrupt; the message names the archive (and member)."""


def archive_kind(path: Path) -> str | None:
    """``"zip"``, ``"tar"`` or None (not an archive), by suffix, else by the first bytes."""
    name = path.name.lower()
    if name.endswith(".zip"):
        return "zip"
    if name.endswith(TAR_SUFFIXES):
        return "tar"
    with open(path, "rb") as fh:
        head = fh.read(264)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ")) or head[257:262] == b"ustar":
        return "tar"
    return None


def member_path(name: str, archive: Path) -> PurePosixPath:
    """The safe relative path of an archive member, or :class:`ArchiveError` if it would escape."""
    norm = name.replace("\\", "/")
    p = PurePosixPath(norm)
    if p.is_absolute() or (len(norm) > 1 and norm[1] == ":"):
        raise ArchiveError(f"{archive}: member {name!r} has an absolute path; refusing to extract")
    if ".." in p.parts:
        raise ArchiveError(f"{archive}: member {name!r} points outside the extraction folder ('..'); "
                           "refusing to extract")
    if len(norm) > MAX_NAME or any(len(os.fsencode(part)) > NAME_MAX for part in p.parts):
        raise ArchiveError(f"{archive}: member {name[:80]!r}... has a name longer than {MAX_NAME} characters or a "
                           f"path component longer than {NAME_MAX} bytes; refusing")
    return PurePosixPath(*[part for part in p.parts if part not in ("", ".")])


def _filter(archive: Path, name: str, member: tarfile.TarInfo, dest: Path) -> None:
    """The standard library's ``'data'`` filter (PEP 706) on ``member`` as it will be written under ``dest``;
    its refusal becomes an :class:`ArchiveError` naming the archive and the member."""
    for text in (member.name, member.linkname):
        if len(text) > MAX_NAME or any(len(os.fsencode(part)) > NAME_MAX for part in text.split("/")):
            raise ArchiveError(f"{archive}: member {name[:80]!r} has a name or link target longer than {MAX_NAME} "
                               f"characters or with a component longer than {NAME_MAX} bytes; refusing")
    try:
        tarfile.data_filter(member, str(dest))
    except tarfile.AbsoluteLinkError:
        raise ArchiveError(f"{archive}: member {name!r} is a link to the absolute path {member.linkname!r}; "
                           "refusing") from None
    except tarfile.LinkOutsideDestinationError as e:
        raise ArchiveError(f"{archive}: member {name!r} is a link to {member.linkname!r}, outside the extraction "
                           f"folder ({e}); refusing") from None
    except tarfile.AbsolutePathError:
        raise ArchiveError(f"{archive}: member {name!r} has an absolute path; refusing to extract") from None
    except tarfile.OutsideDestinationError as e:
        raise ArchiveError(f"{archive}: member {name!r} would be written outside the extraction folder ({e}); "
                           "refusing") from None
    except tarfile.SpecialFileError:
        raise ArchiveError(f"{archive}: member {name!r} is a device or FIFO; refusing to extract") from None
    except tarfile.FilterError as e:  # any other refusal of the filter
        raise ArchiveError(f"{archive}: member {name!r}: {e}; refusing to extract") from None


def _strip(rel: PurePosixPath, root: PurePosixPath | None) -> PurePosixPath | None:
    """``rel`` relative to ``root`` (None when the member is not under it)."""
    if root is None:
        return rel
    if rel.parts[: len(root.parts)] != root.parts:
        return None
    return PurePosixPath(*rel.parts[len(root.parts):])


def extract(archive: str | Path, dest: str | Path, root: str | None = None,
            members: Iterable[str] | None = None) -> int:
    """Extract ``archive`` into the existing folder ``dest``; return the number of files written.

    ``root``: a folder inside the archive whose content goes to ``dest`` (e.g. ``flickr30k-images``);
    ``members``: only these files (paths inside the archive). An existing file is never overwritten
    (two archives that both hold it are an error).
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise ArchiveError(f"{archive}: archive not found")
    kind = archive_kind(archive)
    if kind is None:
        raise ArchiveError(f"{archive}: not a .zip or .tar(.gz) archive")
    root_p = member_path(root, archive) if root else None
    wanted = {str(member_path(m, archive)) for m in members} if members is not None else None
    try:
        n, found = (_extract_zip if kind == "zip" else _extract_tar)(archive, dest, root_p, wanted)
    except ArchiveError:
        raise
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, OSError) as e:
        if isinstance(e, OSError) and e.errno is not None:
            raise  # a real I/O problem (disk full, permissions): keep its own message
        raise ArchiveError(f"{archive}: truncated or corrupt {kind} archive ({type(e).__name__}: {e}); "
                           "delete it to download it again") from e
    if wanted is not None:
        missing = wanted - found
        if missing:
            raise ArchiveError(f"{archive}: no member(s) {', '.join(sorted(missing))} in this archive")
    if n == 0:
        where = f" under {root!r}" if root else ""
        raise ArchiveError(f"{archive}: no files{where} in this archive (check 'root' in the config)")
    return n


def _target(dest: Path, rel: PurePosixPath, archive: Path, name: str, is_dir: bool = False) -> Path:
    out = dest.joinpath(*rel.parts)
    folder = dest
    for part in rel.parts[:-1]:  # every folder on the way must be one (not a file, nor a link to nothing)
        folder = folder / part
        if (folder.is_symlink() or folder.exists()) and not folder.is_dir():
            raise ArchiveError(f"{archive}: member {name!r} needs the folder {folder.relative_to(dest)}, which is "
                               "a file or a broken link (from this or an earlier archive); refusing")
    # a link extracted earlier could redirect a later member: resolve and check again
    if not out.parent.resolve().is_relative_to(dest.resolve()):
        raise ArchiveError(f"{archive}: member {name!r} would be written outside the extraction folder "
                           "(through a link); refusing")
    if is_dir and out.is_dir() and not out.is_symlink():
        return out  # folders may be listed after their files, or by several archives
    if os.path.lexists(out):
        raise ArchiveError(f"{archive}: member {name!r} would overwrite {out} (already extracted from this "
                           "or another archive)")
    return out


def _extract_zip(archive: Path, dest: Path, root: PurePosixPath | None,
                 wanted: set[str] | None) -> tuple[int, set[str]]:
    found: set[str] = set()
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        plan = []
        for info in infos:  # check every member before writing anything
            rel = member_path(info.filename, archive)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise ArchiveError(f"{archive}: member {info.filename!r} is a symbolic link; links in zip archives "
                                   "are not extracted (refusing)")
            if wanted is not None and str(rel) not in wanted:
                continue
            sub = _strip(rel, root)
            if sub is None or not sub.parts:
                continue
            plan.append((info, sub))
        need = sum(i.file_size for i, _ in plan)
        free = shutil.disk_usage(dest).free
        if need > free:
            raise ArchiveError(f"{archive}: needs {need / 1e9:.1f} GB to extract, only {free / 1e9:.1f} GB free "
                               f"in {dest}")
        n = 0
        for info, sub in progress(plan, f"extracting {archive.name}", len(plan), unit="file"):
            out = _target(dest, sub, archive, info.filename, info.is_dir())
            if info.is_dir():
                out.mkdir(parents=True, exist_ok=True)
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(out, "xb") as dst:  # reading checks the CRC; "x": never through a link
                shutil.copyfileobj(src, dst, 1 << 20)
            found.add(str(member_path(info.filename, archive)))
            n += 1
    return n, found


def _extract_tar(archive: Path, dest: Path, root: PurePosixPath | None,
                 wanted: set[str] | None) -> tuple[int, set[str]]:
    found: set[str] = set()
    n = 0
    with tarfile.open(archive, "r:*") as tf:
        for m in progress(tf, f"extracting {archive.name}", unit="member"):  # one streaming pass
            rel = member_path(m.name, archive)
            if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
                raise ArchiveError(f"{archive}: member {m.name!r} is a device or FIFO; refusing to extract")
            _filter(archive, m.name, m, dest)  # every member, also those not extracted
            if wanted is not None and str(rel) not in wanted:
                continue
            sub = _strip(rel, root)
            if sub is None or not sub.parts:
                continue
            linkname = m.linkname
            if m.islnk():  # a hard link names another member (path inside the archive)
                link_rel = _strip(member_path(m.linkname, archive), root)
                if link_rel is None or not link_rel.parts:
                    raise ArchiveError(f"{archive}: member {m.name!r} is a hard link to {m.linkname!r}, "
                                       f"outside {root}; refusing")
                linkname = str(link_rel)
            member = m.replace(name=str(sub), linkname=linkname, deep=False)
            _filter(archive, m.name, member, dest)  # as it will be written (root stripped)
            out = _target(dest, sub, archive, m.name, m.isdir())
            if m.isdir():
                out.mkdir(parents=True, exist_ok=True)
                continue
            if m.islnk():
                source = dest.joinpath(*PurePosixPath(linkname).parts)
                if source.is_symlink() or not source.is_file():
                    raise ArchiveError(f"{archive}: member {m.name!r} is a hard link to {m.linkname!r}, which is "
                                       "not a regular file extracted before it; refusing")
            tf.extract(member, dest, set_attrs=not m.issym(), filter="data")
            found.add(str(rel))
            n += 1
    return n, found


def extract_to(archives: list[tuple[Path, str | None]], final: str | Path) -> int:
    """Extract several archives (each with its ``root``) into one new folder ``final``, atomically.

    Everything goes to a temporary sibling folder, renamed to ``final`` only when all archives were
    extracted; on any error the temporary folder is removed and ``final`` is left as it was.
    """
    final = Path(final)
    n = 0
    with atomic_path(final) as tmp:
        tmp.mkdir(parents=True)
        for archive, root in archives:
            k = extract(archive, tmp, root)
            log.info("%s: %d files extracted%s", archive, k, f" (from {root}/)" if root else "")
            n += k
    return n


def extract_member(archive: str | Path, member: str, dest: str | Path) -> Path:
    """Extract one file of ``archive`` (path inside it) to ``dest`` atomically."""
    archive, dest = Path(archive), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.stem}.tmp-member-") as tmp:
        extract(archive, tmp, members=[member])
        with atomic_path(dest) as out:
            os.replace(Path(tmp).joinpath(*member_path(member, archive).parts), out)
    return dest
