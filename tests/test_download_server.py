"""A local HTTP server for the download tests (and its own self-test): 127.0.0.1 only, bounded in
time and requests; nothing in the download tests touches the real internet.

Serves ``files`` (path → bytes) with Range support; can drop the connection once mid-file
(``drop_after[path] = n``: send the headers of the full response, then ``n`` bytes, then close),
replace a file by a new version right after that drop (``after_drop[path] = (bytes, etag)``),
ignore Range requests (``ignore_range``) or If-Range (``ignore_if_range``), answer 503 a number of
times (``fail_503[path] = k``), redirect (``redirects[path] = location``), send a file without
Content-Length (``no_length``), give no ETag (``etag[path] = None``; default ``"v1"``) or a
Last-Modified date (``last_modified``), serve over TLS (``LocalServer(..., tls=(cert, key))``), and
logs every request as ``(path, range_header, status, bytes_sent)``.
"""

from __future__ import annotations

import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class ServerState:
    files: dict[str, bytes]
    drop_after: dict[str, int] = field(default_factory=dict)
    fail_503: dict[str, int] = field(default_factory=dict)
    ignore_range: bool = False
    ignore_if_range: bool = False
    after_drop: dict[str, tuple[bytes, str | None]] = field(default_factory=dict)
    redirects: dict[str, str] = field(default_factory=dict)
    no_length: set[str] = field(default_factory=set)
    etag: dict[str, str | None] = field(default_factory=dict)
    last_modified: dict[str, str] = field(default_factory=dict)
    log: list[tuple[str, str | None, int, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def served(self, path: str) -> int:
        return sum(n for p, _, _, n in self.log if p == path)

    def requests(self, path: str) -> list[tuple[str, str | None, int, int]]:
        return [r for r in self.log if r[0] == path]


def _handler(state: ServerState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep the test output quiet
            pass

        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            path, rng = self.path, self.headers.get("Range")
            if path in state.redirects:
                return self._done(path, rng, 302, b"", {"Location": state.redirects[path]})
            data = state.files.get(path)
            if data is None:
                return self._done(path, rng, 404, b"not found", {})
            with state.lock:
                fail = state.fail_503.get(path, 0) > 0
                if fail:
                    state.fail_503[path] -= 1
                drop = None if fail else state.drop_after.pop(path, None)
            if fail:
                return self._done(path, rng, 503, b"busy", {})
            start = 0
            etag = state.etag.get(path, '"v1"')
            if_range = self.headers.get("If-Range")
            if (rng and if_range is not None and not state.ignore_if_range
                    and if_range not in (etag, state.last_modified.get(path))):
                rng = None  # RFC 9110: the representation changed, send all of it
            if rng and not state.ignore_range:
                start = int(rng.removeprefix("bytes=").split("-")[0])
                if start >= len(data):
                    return self._done(path, rng, 416, b"", {"Content-Range": f"bytes */{len(data)}"})
            body = data[start:]
            headers = {"ETag": etag} if etag is not None else {}
            if path in state.last_modified:
                headers["Last-Modified"] = state.last_modified[path]
            status = 200
            if start:
                status = 206
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            if drop is not None:  # announce the full body, send part of it, hang up
                self.send_response(status)
                for k, v in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body[:drop])
                self.wfile.flush()
                self.close_connection = True
                with state.lock:
                    state.log.append((path, rng, status, drop))
                    if path in state.after_drop:
                        state.files[path], state.etag[path] = state.after_drop.pop(path)
                return None
            return self._done(path, rng, status, body, headers)

        def _done(self, path: str, rng: str | None, status: int, body: bytes, headers: dict[str, str]) -> None:
            self.send_response(status)
            if path not in state.no_length:
                headers = {**headers, "Content-Length": str(len(body))}
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
            with state.lock:
                state.log.append((path, rng, status, len(body)))

    return Handler


class LocalServer:
    """``with LocalServer(state) as base_url:`` — serves until the block ends, ``max_seconds`` pass or
    ``max_requests`` were handled, whichever comes first."""

    def __init__(self, state: ServerState, max_seconds: float = 60.0, max_requests: int = 200,
                 tls: tuple[str, str] | None = None):
        self.state, self.max_seconds, self.max_requests = state, max_seconds, max_requests
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
        self.scheme = "http"
        if tls is not None:  # (certificate, key) files
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*tls)
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
            self.scheme = "https"
        self.server.timeout = 0.2
        self.server.daemon_threads = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline and len(self.state.log) < self.max_requests:
            self.server.handle_request()
        self.server.server_close()

    def __enter__(self) -> str:
        self._thread.start()
        host, port = self.server.server_address[:2]
        return f"{self.scheme}://{host}:{port}"

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def test_server_supports_range_and_stops_by_itself():
    import requests

    state = ServerState(files={"/f.bin": bytes(range(256)) * 4})
    with LocalServer(state, max_seconds=10, max_requests=3) as base:
        r = requests.get(base + "/f.bin", headers={"Range": "bytes=1000-"}, timeout=5)
        assert r.status_code == 206 and r.content == (bytes(range(256)) * 4)[1000:]
        assert r.headers["Content-Range"] == "bytes 1000-1023/1024"
        assert requests.get(base + "/missing", timeout=5).status_code == 404
    assert state.log == [("/f.bin", "bytes=1000-", 206, 24), ("/missing", None, 404, 9)]


# --- a miniature COCO / Flickr30K layout made by the tests ----------------------------------------------

def _image(path, mode: str, seed: int) -> None:
    from PIL import Image

    im = Image.effect_noise((64 + seed, 48), 40 + seed).convert(mode)  # noise: a few KB even when tiny
    fmt = "PNG" if mode in ("P", "RGBA", "LA") else "JPEG"
    im.save(path, fmt)


def _entry(i: int, filepath: str | None, filename: str, split: str, cocoid: bool) -> dict:
    e = {"filename": filename, "split": split, "imgid": i,
         "sentences": [{"raw": f"Image {i} caption {k}.", "sentid": 5 * i + k, "imgid": i} for k in range(5)]}
    if filepath is not None:
        e["filepath"] = filepath
    if cocoid:
        e["cocoid"] = 1000 + i
    return e


def make_mini_coco(root, corrupt: str | None = None) -> dict[str, bytes]:
    """Files of a miniature COCO 2014 + Karpathy layout: ``{archive name: bytes}``.

    train2014.zip (3 images: RGB, grayscale, CMYK), val2014.zip (3 images: palette, RGBA, RGB; splits
    restval / val / test), caption_datasets.zip (dataset_coco.json + dataset_flickr30k.json).
    ``corrupt``: name of an image whose last quarter is cut off (a truncated JPEG, header intact).
    """
    import io
    import json
    import zipfile
    from pathlib import Path

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    layout = {"train2014": [("RGB", "train"), ("L", "train"), ("CMYK", "train")],
              "val2014": [("P", "restval"), ("RGBA", "val"), ("RGB", "test")]}
    entries, out = [], {}
    i = 0
    for folder, imgs in layout.items():
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for mode, split in imgs:
                name = f"COCO_{folder}_{1000 + i:012d}.jpg"
                tmp = root / name
                _image(tmp, mode, i)
                data = tmp.read_bytes()
                if name == corrupt:
                    data = data[: len(data) * 3 // 4]
                zf.writestr(f"{folder}/{name}", data)
                entries.append(_entry(i, folder, name, split, cocoid=True))
                i += 1
        out[f"{folder}.zip"] = buf.getvalue()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("dataset_coco.json", json.dumps({"images": entries, "dataset": "coco"}))
        zf.writestr("dataset_flickr30k.json", json.dumps(mini_f30k_json()))
    out["caption_datasets.zip"] = buf.getvalue()
    return out


def mini_f30k_json() -> dict:
    splits = ["train", "train", "val", "test"]
    return {"images": [_entry(i, None, f"{100 + i}.jpg", s, cocoid=False) for i, s in enumerate(splits)],
            "dataset": "flickr30k"}


def make_mini_f30k_images(folder) -> None:
    """The 4 images of :func:`mini_f30k_json` in ``folder`` (one grayscale, one with alpha)."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, mode in enumerate(["RGB", "L", "RGB", "LA"]):
        _image(folder / f"{100 + i}.jpg", mode, i)
