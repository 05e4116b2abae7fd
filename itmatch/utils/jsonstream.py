"""Streaming the items of one top-level array of a large JSON object file (COCO's Karpathy JSON, ~140 MB, would
take ~1 GB as Python objects), with the standard library's decoder for each item."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_AFTER_VALUE = frozenset(" \t\n\r,]}:")  # what follows a complete value in valid JSON


class Unstreamable(Exception):
    """The file is not a plain JSON object holding the array once (malformed, another layout, a repeated key): the
    caller reads it whole with ``json.load`` instead, for its result or its error message."""


def stream_array(path: Path, key: str, chunk: int = 1 << 20) -> Iterator[Any]:
    """The items of the top-level ``key`` array of a JSON object file, decoded one at a time with the standard
    library's decoder (so each value is exactly what ``json.load`` gives), reading ``chunk`` characters at a time.
    Raises :class:`Unstreamable` on anything else (malformed text, another layout, a repeated key)."""
    dec = json.JSONDecoder()
    ws = json.decoder.WHITESPACE.match
    with open(path, encoding="utf-8") as fh:
        buf, pos, eof = "", 0, False

        def fill() -> bool:  # more text after buf[pos:]; False at the end of the file
            nonlocal buf, pos, eof
            if eof:
                return False
            more = fh.read(max(chunk, 2 * (len(buf) - pos)))
            buf, pos, eof = buf[pos:] + more, 0, not more
            return bool(more)

        def skip_ws() -> str:  # the next non-whitespace character ("" at the end)
            nonlocal pos
            while True:
                pos = ws(buf, pos).end()
                if pos < len(buf) or not fill():
                    return buf[pos:pos + 1]

        def value() -> Any:  # the next JSON value (reading on while it is cut by the buffer's end)
            nonlocal pos
            skip_ws()
            while True:
                try:
                    v, end = dec.raw_decode(buf, pos)
                    # complete unless it may go on in the next read: a number cut as "2." or "2.5e" decodes as 2
                    if eof or (end < len(buf) and buf[end] in _AFTER_VALUE):
                        pos = end
                        return v
                except json.JSONDecodeError:
                    if eof:
                        raise Unstreamable from None
                fill()  # (at the end of the file it sets eof: the next failure is final)

        if skip_ws() != "{":
            raise Unstreamable
        pos += 1
        found = False
        while True:
            c = skip_ws()
            if c == "}" and not found:
                raise Unstreamable
            if c == "}":
                pos += 1
                if skip_ws() != "":
                    raise Unstreamable
                return
            name = value()
            if not isinstance(name, str) or skip_ws() != ":":
                raise Unstreamable
            pos += 1
            if name == key:
                if found or skip_ws() != "[":
                    raise Unstreamable
                found = True
                pos += 1
                if skip_ws() == "]":
                    pos += 1
                else:
                    while True:
                        yield value()
                        c = skip_ws()
                        pos += 1
                        if c == "]":
                            break
                        if c != ",":
                            raise Unstreamable
            else:
                value()
            c = skip_ws()
            if c == ",":
                pos += 1
            elif c != "}":
                raise Unstreamable
