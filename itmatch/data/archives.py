"""Safe extraction of ``.zip`` and ``.tar[.gz|.bz2|.xz]`` archives.

Every member is checked before it is written: no absolute path, no ``..`` component, no link whose
target lies outside the extraction folder, no device / FIFO entries; an offending member stops the
extraction with :class:`ArchiveError` naming the archive and the member. A truncated or corrupt
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
    return PurePosixPath(*[part for part in p.parts if part not in ("", ".")])


def _check_link(archive: Path, name: str, rel: PurePosixPath, target: str) -> None:
    """A symlink at ``rel`` pointing to ``target`` must stay inside the extraction folder."""
    if target.startswith("/") or (len(target) > 1 and target[1] == ":"):
        raise ArchiveError(f"{archive}: member {name!r} is a link to the absolute path {target!r}; refusing")
    depth = len(rel.parts) - 1
    for part in PurePosixPath(target.replace("\\", "/")).parts:
        depth += -1 if part == ".." else (0 if part in ("", ".") else 1)
        if depth < 0:
            raise ArchiveError(f"{archive}: member {name!r} is a link to {target!r}, outside the extraction "
                               "folder; refusing")


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
    # a link extracted earlier could redirect a later member: resolve and check again
    if not out.parent.resolve().is_relative_to(dest.resolve()):
        raise ArchiveError(f"{archive}: member {name!r} would be written outside the extraction folder "
                           "(through a link); refusing")
    if is_dir and out.is_dir() and not out.is_symlink():
        return out  # folders may be listed after their files, or by several archives
    if out.exists() or out.is_symlink():
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
                _check_link(archive, info.filename, rel, zf.read(info).decode("utf-8", "replace"))
            if wanted is not None and str(rel) not in wanted:
                continue
            sub = _strip(rel, root)
            if sub is None or not sub.parts:
                continue
            plan.append((info, sub, mode))
        need = sum(i.file_size for i, _, _ in plan)
        free = shutil.disk_usage(dest).free
        if need > free:
            raise ArchiveError(f"{archive}: needs {need / 1e9:.1f} GB to extract, only {free / 1e9:.1f} GB free "
                               f"in {dest}")
        n = 0
        for info, sub, mode in progress(plan, f"extracting {archive.name}", len(plan), unit="file"):
            out = _target(dest, sub, archive, info.filename, info.is_dir())
            if info.is_dir():
                out.mkdir(parents=True, exist_ok=True)
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            if stat.S_ISLNK(mode):
                os.symlink(zf.read(info).decode("utf-8"), out)
            else:
                with zf.open(info) as src, open(out, "wb") as dst:  # reading checks the CRC
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
            if m.issym():
                _check_link(archive, m.name, rel, m.linkname)
            elif m.islnk():
                member_path(m.linkname, archive)
            elif not (m.isfile() or m.isdir()):
                raise ArchiveError(f"{archive}: member {m.name!r} is a device or FIFO; refusing to extract")
            if wanted is not None and str(rel) not in wanted:
                continue
            sub = _strip(rel, root)
            if sub is None or not sub.parts:
                continue
            out = _target(dest, sub, archive, m.name, m.isdir())
            if m.isdir():
                out.mkdir(parents=True, exist_ok=True)
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            if m.issym():
                os.symlink(m.linkname, out)
            elif m.islnk():
                link_rel = _strip(member_path(m.linkname, archive), root)
                if link_rel is None:
                    raise ArchiveError(f"{archive}: member {m.name!r} is a hard link to {m.linkname!r}, "
                                       f"outside {root}; refusing")
                shutil.copyfile(dest.joinpath(*link_rel.parts), out)
            else:
                src = tf.extractfile(m)
                assert src is not None
                with src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
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
