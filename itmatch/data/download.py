"""Streamed, resumable, verified HTTP downloads (and local files checked the same way).

``fetch(url, dest, ...)`` never leaves an unverified file under ``dest``:

* bytes go to ``dest + ".part"``; after an interruption (dropped connection, killed job) the next
  attempt asks for the rest with ``Range: bytes=N-`` and ``If-Range`` with the first response's
  strong ETag / Last-Modified, so a file that changed on the server restarts from zero; a server that
  gave no such validator cannot tell, so the download restarts from zero instead of splicing two
  versions; a 206 whose validator differs from the first response's also restarts;
* a server that ignores Range (answers 200 to a Range request) restarts the part file cleanly;
* redirects are followed by hand (at most ``MAX_REDIRECTS``): only to http(s), and never from https
  back to http (a downgrade is a :class:`DownloadError` naming both URLs);
* at most the configured ``size`` bytes are written, or ``max_unknown_size`` when no size is
  configured (``download.max_unknown_size``); a server announcing or sending more is an error;
* connection errors, timeouts, 408/429 and 5xx are retried with exponential backoff (the failure
  count resets whenever an attempt made progress); other 4xx fail at once, naming the URL;
* the complete part file is checked (size, SHA-256, MD5 when given) and only then renamed to
  ``dest``; a mismatch deletes the part file (it cannot be trusted) and raises :class:`ChecksumError`;
* a verified file gets a sidecar ``dest + ".verified"`` (size, mtime, digests, URL): as long as the
  file is unchanged it is never fetched or hashed again;
* one process at a time per file (``fcntl`` lock on ``dest + ".lock"``), so two datasets sharing an
  archive (COCO and Flickr30K share the Karpathy caption archive) do not write the same part file;
* with a digest lock file (``RetryPolicy.lock``; :func:`itmatch.data.acquire.acquire` uses
  ``<cache>.lock.json``, i.e. ``resources/downloads.lock.json``), the SHA-256 of every file is recorded
  the first time it is downloaded, and every later run (or another machine given the same lock file)
  must find the same digest: a mismatch is a :class:`ChecksumError` naming the file, the recorded
  and the received digest.

Progress (bytes, rate, ETA) is a tqdm bar on stderr, i.e. in the rule's log.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import urllib3
from tqdm import tqdm

from itmatch.config import schema_defaults
from itmatch.utils.logs import log

CHUNK = 1 << 20
MAX_REDIRECTS = 10
_DEFAULTS = schema_defaults("$defs.download")  # the schema: the one home of the defaults
DEFAULT_MAX_UNKNOWN_SIZE: int = _DEFAULTS["max_unknown_size"]  # bytes (32 GiB)
# a dropped / stalled connection, seen by requests (connecting) or urllib3 (streaming) or the socket
_STREAM_ERRORS = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                  urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)


class DownloadError(RuntimeError):
    """A file could not be obtained; the message names the URL and the reason."""


class ChecksumError(DownloadError):
    """A downloaded or local file does not match its expected size or digest."""


@dataclass
class RetryPolicy:
    """How files are fetched. Retries on connection errors / 5xx: wait ``backoff * 2**k`` seconds (capped)
    before retry k+1; ``max_unknown_size``: byte limit of a file without configured size; ``lock``: the
    digest lock file (None: no digests recorded)."""

    retries: int = _DEFAULTS["retries"]  # consecutive failed attempts without progress before giving up
    backoff: float = _DEFAULTS["backoff"]  # seconds before the first retry
    backoff_max: float = _DEFAULTS["backoff_max"]
    timeout: float = _DEFAULTS["timeout"]  # seconds to connect and between two received chunks
    max_unknown_size: int = DEFAULT_MAX_UNKNOWN_SIZE
    lock: Path | None = None

    def wait(self, failures: int) -> float:
        return min(self.backoff * 2 ** max(failures - 1, 0), self.backoff_max)

    @classmethod
    def from_config(cls, cfg: dict[str, Any], lock: Path | None = None) -> RetryPolicy:
        keys = ("retries", "backoff", "backoff_max", "timeout", "max_unknown_size")
        return cls(**{k: cfg[k] for k in keys if k in cfg}, lock=lock)


@dataclass(frozen=True)
class Expected:
    """What a file must be: size in bytes and digests (hex), each optional (None = not checked)."""

    size: int | None = None
    sha256: str | None = None
    md5: str | None = None

    def describe(self) -> str:
        parts = [f"{k} {v}" for k, v in (("size", self.size), ("sha256", self.sha256), ("md5", self.md5)) if v]
        return ", ".join(parts) or "nothing (no size or checksum configured)"

    def mismatch(self, size: int, digests: dict[str, str | None] | None = None) -> str | None:
        """Why a file of ``size`` bytes (and ``digests``, when given) is not this, or None if it matches."""
        if self.size is not None and size != self.size:
            return f"size {size} bytes, expected {self.size}"
        if digests is not None:
            for algo in ("sha256", "md5"):
                want = getattr(self, algo)
                if want and digests.get(algo) != want.lower():
                    return f"{algo} {digests.get(algo)}, expected {want.lower()}"
        return None


def is_remote(url: str) -> bool:
    return urllib.parse.urlparse(url).scheme in ("http", "https")


def local_path(url: str) -> Path:
    """The local path of a ``file://`` URL or a plain path (``~`` expanded)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        return Path(urllib.parse.unquote(parsed.path))
    return Path(url).expanduser()


def file_name(url: str) -> str:
    """The last path component of a URL or path (the cache file name)."""
    name = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name
    if not name:
        raise DownloadError(f"{url}: cannot derive a file name from this URL; set 'name' in its config entry")
    return name


def digests(path: Path, chunk: int = CHUNK) -> dict[str, str]:
    """SHA-256 and MD5 of a file in one pass."""
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    size = path.stat().st_size
    with open(path, "rb") as fh, _bar(f"verifying {path.name}", size) as bar:
        while block := fh.read(chunk):
            sha.update(block)
            md5.update(block)
            bar.update(len(block))
    return {"sha256": sha.hexdigest(), "md5": md5.hexdigest()}


def check(path: Path, expected: Expected, what: str) -> dict[str, Any]:
    """Raise :class:`ChecksumError` unless ``path`` matches ``expected``; return its size and digests."""
    size = path.stat().st_size
    if why := expected.mismatch(size):  # before hashing: a wrong size needs no digest
        raise ChecksumError(f"{what}: {why}")
    got = digests(path)
    if why := expected.mismatch(size, got):
        raise ChecksumError(f"{what}: {why}")
    return {"size": size, **got}


def sidecar(dest: Path) -> Path:
    """The verification record written next to a downloaded ``dest``."""
    return dest.with_name(dest.name + ".verified")


def already_verified(dest: Path, expected: Expected, url: str | None = None) -> bool:
    """True when ``dest`` carries a sidecar written by a previous verification, is unchanged since
    (size, mtime) and the sidecar's digests satisfy ``expected``. With nothing to check against
    (no size or digest configured) the URL must also be the same."""
    side = sidecar(dest)
    if not dest.is_file() or not side.is_file():
        return False
    try:
        rec = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    st = dest.stat()
    if rec.get("size") != st.st_size or rec.get("mtime_ns") != st.st_mtime_ns:
        return False
    if expected.mismatch(rec["size"], rec) is not None:
        return False
    if expected == Expected() and url is not None and rec.get("url") != url:
        return False
    return True


def _write_sidecar(dest: Path, info: dict[str, Any], url: str) -> None:
    st = dest.stat()
    rec = {**info, "mtime_ns": st.st_mtime_ns, "url": url}
    tmp = sidecar(dest).with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=1) + "\n")
    os.replace(tmp, sidecar(dest))


def verify_local(path: Path, expected: Expected) -> tuple[Path, dict[str, Any] | None]:
    """A local file (archive or JSON) used in place: it must exist and match ``expected``.

    Returns the path and its size + digests (None when nothing is configured to check). Nothing is
    written next to the user's file, so a local file with a checksum is hashed again on each run.
    """
    if not path.is_file():
        raise DownloadError(f"{path}: local file not found")
    if expected == Expected():
        return path, None
    return path, check(path, expected, str(path))


def verified_record(dest: Path) -> dict[str, Any] | None:
    """The sidecar record of a downloaded file (size, digests, URL), if any."""
    try:
        rec = json.loads(sidecar(dest).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return {k: v for k, v in rec.items() if k != "mtime_ns"}


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    lock = path.with_name(path.name + ".lock")
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def pin_digest(lock: Path, dest: Path, info: dict[str, Any], url: str) -> None:
    """Record ``dest``'s SHA-256 in the lock file the first time; afterwards it must match the record.

    Entries are keyed by the cache file name (a mirror URL for the same file shares the record).
    """
    lock.parent.mkdir(parents=True, exist_ok=True)
    with _lock(lock):
        data: dict[str, Any] = {"version": 1, "files": {}}
        if lock.exists():
            try:
                data = json.loads(lock.read_text())
                files = data["files"]
                assert isinstance(files, dict)
            except (json.JSONDecodeError, KeyError, TypeError, AssertionError) as e:
                raise DownloadError(f"{lock}: not a valid download lock file ({type(e).__name__}); fix or "
                                    "delete it") from None
        entry = data["files"].get(dest.name)
        if entry is None:
            data["files"][dest.name] = {"sha256": info["sha256"], "size": info["size"], "url": url,
                                        "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            tmp = lock.with_name(lock.name + ".tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
            os.replace(tmp, lock)
            log.info("%s: sha256 %s recorded in %s", dest.name, info["sha256"], lock)
        elif entry.get("sha256") != info["sha256"]:
            raise ChecksumError(
                f"{dest.name} (from {url}): sha256 {info['sha256']}, expected {entry.get('sha256')} as recorded in "
                f"{lock} when it was first downloaded (from {entry.get('url')}, {entry.get('recorded')}). The file "
                f"changed on the server or was altered in transit; if the new version is right, delete the entry "
                f"{dest.name!r} from {lock}")


def _bar(desc: str, total: int | None, initial: int = 0) -> tqdm:
    return tqdm(desc=desc, total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
                file=sys.stderr, mininterval=0.5 if sys.stderr.isatty() else 10.0, dynamic_ncols=True)


class _Retry(Exception):
    """An attempt failed in a way worth retrying (after backoff)."""


def fetch(url: str, dest: str | Path, expected: Expected = Expected(), policy: RetryPolicy | None = None,
          session: requests.Session | None = None, chunk: int = CHUNK) -> Path:
    """Download ``url`` to ``dest`` (resuming, retrying, verifying); return ``dest``.

    Does nothing when ``dest`` was already verified against ``expected``. Raises
    :class:`DownloadError` (or :class:`ChecksumError`) naming the URL when it cannot succeed.
    """
    dest = Path(dest)
    policy = policy or RetryPolicy()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _lock(dest):
        if already_verified(dest, expected, url):
            if policy.lock is not None:
                pin_digest(policy.lock, dest, verified_record(dest) or check(dest, expected, str(dest)), url)
            log.info("%s: already downloaded and verified, not fetched again", dest)
            return dest
        if dest.exists():
            try:  # a file under the final name without (matching) sidecar: trust it only after a check
                if expected != Expected():
                    info = check(dest, expected, str(dest))
                    if policy.lock is not None:
                        pin_digest(policy.lock, dest, info, url)
                    _write_sidecar(dest, info, url)
                    log.info("%s: present and matches %s, not fetched again", dest, expected.describe())
                    return dest
            except ChecksumError as e:
                log.warning("%s; fetching it again", e)
            dest.unlink()
        part = dest.with_name(dest.name + ".part")
        _download(url, part, expected, policy, session or requests.Session(), chunk)
        try:
            info = check(part, expected, f"{url} (downloaded to {part})")
            if policy.lock is not None:
                pin_digest(policy.lock, dest, info, url)
        except ChecksumError:
            part.unlink(missing_ok=True)
            part.with_name(part.name + ".json").unlink(missing_ok=True)
            raise
        os.replace(part, dest)
        part.with_name(part.name + ".json").unlink(missing_ok=True)
        _write_sidecar(dest, info, url)
        log.info("%s: downloaded and verified (%d bytes, sha256 %s)", dest, info["size"], info["sha256"])
        return dest


def _download(url: str, part: Path, expected: Expected, policy: RetryPolicy, session: requests.Session,
              chunk: int) -> None:
    """Fill ``part`` with the whole of ``url`` (resuming what is there)."""
    meta_path = part.with_name(part.name + ".json")  # validators of the response the part file came from
    failures = 0
    total = expected.size
    while True:
        offset = part.stat().st_size if part.exists() else 0
        meta = _read_meta(meta_path) if offset else {}
        if offset and meta.get("url") != url:
            log.info("%s: partial file from another URL (%s); starting over", part, meta.get("url"))
            offset = 0
        if offset and not meta.get("validator"):
            log.warning("%s: the server gave no ETag / Last-Modified for this file, so a resumed download could "
                        "splice two versions; starting over from byte 0", part)
            offset = 0
        limit = total if total is not None else policy.max_unknown_size
        if offset > limit:
            log.warning("%s: %d bytes, more than the limit %d; starting over", part, offset, limit)
            offset = 0
        if total is not None and offset == total:
            return
        try:
            received, done, total = _attempt(url, part, meta_path, offset, total, meta, policy, session, chunk)
            if done:
                return
            reason = f"connection closed after {received} bytes"
        except _Retry as e:
            reason, received = e.args[0], e.args[1]
        except _STREAM_ERRORS as e:
            reason, received = f"{type(e).__name__}: {e}", 0
        if received:
            failures = 0  # progress was made: this is a flaky link, not a dead one
        failures += 1
        if failures > policy.retries:
            raise DownloadError(f"{url}: giving up after {policy.retries} retries without progress; "
                                f"last error: {reason} (the partial file {part} is kept; rerun to resume)")
        wait = policy.wait(failures)
        log.warning("%s: %s; retry %d/%d in %.1f s (resuming from byte %d)", url, reason, failures,
                    policy.retries, wait, part.stat().st_size if part.exists() else 0)
        time.sleep(wait)


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _attempt(url: str, part: Path, meta_path: Path, offset: int, total: int | None, meta: dict[str, Any],
             policy: RetryPolicy, session: requests.Session, chunk: int) -> tuple[int, bool, int | None]:
    """One request. Returns (bytes received, complete?, total size). Raises _Retry / DownloadError."""
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        headers["If-Range"] = meta["validator"]  # _download restarts when there is none
    limit = total if total is not None else policy.max_unknown_size
    with _get(session, url, headers, policy.timeout) as r:
        status = r.status_code
        if status in (408, 429) or status >= 500:
            raise _Retry(f"HTTP {status} {r.reason}", 0)
        if status == 416 and offset:
            # our range starts at or past the end: the part file is complete if the server says so
            size = _content_range_total(r.headers.get("Content-Range", ""))
            if size == offset:
                return 0, True, size
            log.warning("%s: server refused range from byte %d (size %s); starting over", url, offset, size)
            part.unlink(missing_ok=True)
            raise _Retry("HTTP 416 for a stale partial file", 0)
        if status >= 400:
            raise DownloadError(f"{url}: HTTP {status} {r.reason} (check the URL in the config, or point it "
                                "to a mirror or a local copy)")
        length = r.headers.get("Content-Length")
        if status == 206:
            start = _content_range_start(r.headers.get("Content-Range", ""))
            if start != offset:
                log.warning("%s: server answered range %r to a request from byte %d; starting over", url,
                            r.headers.get("Content-Range"), offset)
                part.unlink(missing_ok=True)
                raise _Retry("unexpected Content-Range", 0)
            got = _validator(r.headers)
            if got is not None and got != meta.get("validator"):
                log.warning("%s: the server's validator changed (%s, was %s); starting over", url, got,
                            meta.get("validator"))
                part.unlink(missing_ok=True)
                raise _Retry("file changed on the server", 0)
            size = _content_range_total(r.headers.get("Content-Range", ""))
            mode = "ab"
        else:  # 200: the whole file, whether we asked for a range or not
            if offset:
                log.warning("%s: server ignored the Range request (HTTP %d); restarting from byte 0", url, status)
            offset, mode = 0, "wb"
            size = int(length) if length is not None else None
            meta_path.write_text(json.dumps({"url": url, "validator": _validator(r.headers)}) + "\n")
        if total is not None and size is not None and size != total:
            raise ChecksumError(f"{url}: server reports {size} bytes, expected {total} (wrong URL or file "
                                "changed on the server; fix the size/checksum in the config)")
        if size is not None and size > limit:
            part.unlink(missing_ok=True)
            meta_path.unlink(missing_ok=True)
            raise DownloadError(f"{url}: server announces {size} bytes, more than download.max_unknown_size "
                                f"({limit} bytes) for an entry without 'size'; set its size in the config")
        total = total if total is not None else size
        received = 0
        with open(part, mode) as fh, _bar(part.name.removesuffix(".part"), total, offset) as bar:
            try:
                # read1: whatever has arrived (≤ chunk), so a dropped connection loses no received byte
                while block := r.raw.read1(chunk):
                    if offset + received + len(block) > limit:
                        fh.close()
                        part.unlink(missing_ok=True)
                        meta_path.unlink(missing_ok=True)
                        what = (f"the configured size {limit}" if total is not None and limit == total else
                                f"download.max_unknown_size ({limit} bytes); set 'size' in its config entry")
                        raise DownloadError(f"{url}: the server sent more than {what}")
                    fh.write(block)
                    received += len(block)
                    bar.update(len(block))
            except _STREAM_ERRORS as e:
                fh.flush()
                raise _Retry(f"{type(e).__name__} after {received} bytes: {e}", received) from e
            fh.flush()
            os.fsync(fh.fileno())
        expected_len = int(length) if length is not None else None
        complete = expected_len is None or received == expected_len
        if total is not None:
            complete = complete and offset + received == total
        return received, complete, total


def _validator(headers: Any) -> str | None:
    """A validator usable with If-Range: a strong ETag, else Last-Modified (None when neither)."""
    etag = headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return headers.get("Last-Modified") or None


def _get(session: requests.Session, url: str, headers: dict[str, str], timeout: float) -> requests.Response:
    """GET ``url`` following redirects by hand: only to http(s), never from https back to http."""
    secure = False
    for _ in range(MAX_REDIRECTS + 1):
        scheme = urllib.parse.urlparse(url).scheme
        secure = secure or scheme == "https"
        r = session.get(url, headers=headers, stream=True, timeout=timeout, allow_redirects=False)
        if not r.is_redirect:
            return r
        target = urllib.parse.urljoin(url, r.headers["Location"])
        r.close()
        new = urllib.parse.urlparse(target).scheme
        if new not in ("http", "https"):
            raise DownloadError(f"{url}: redirected to {target}, which is not an http(s) URL; refusing")
        if secure and new == "http":
            raise DownloadError(f"{url}: redirected from https to plain http ({target}); refusing the downgrade "
                                "(use an https mirror, or the http URL itself if you accept plain http)")
        url = target
    raise DownloadError(f"{url}: more than {MAX_REDIRECTS} redirects; refusing")


def _content_range_start(value: str) -> int | None:
    # "bytes 100-199/200"
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _content_range_total(value: str) -> int | None:
    # "bytes 100-199/200" or "bytes */200"
    try:
        tail = value.rsplit("/", 1)[1]
        return None if tail == "*" else int(tail)
    except (IndexError, ValueError):
        return None
