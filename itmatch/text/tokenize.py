"""Caption tokenisation: lowercase + nltk's Penn-Treebank word tokenizer (no ``punkt`` needed).

``tokenize(text)`` is exactly ``TreebankWordTokenizer().tokenize(text.lower())``, but fast: the
Treebank rules are local to a whitespace-separated chunk except at the start and the end of the
string, so every distinct ``(chunk, is_first, is_last)`` is tokenised once and memoised. Real
caption corpora reuse few distinct chunks (COCO: ~616k captions, ~40k distinct chunks), which makes
tokenising all of COCO a matter of seconds. ``tests/test_text_tokens.py`` checks the equivalence
against nltk on tricky strings (quotes, contractions, final periods, commas in numbers, brackets).
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Iterable

from nltk.tokenize import TreebankWordTokenizer

_TB = TreebankWordTokenizer()
_SENTINEL = "x"  # a plain word: the Treebank rules see it as ordinary surrounding text


class _MiddleCache(dict):
    """chunk → tokens of a chunk in the middle of a caption (filled on first use)."""

    def __missing__(self, chunk: str) -> tuple[str, ...]:
        out = tuple(_TB.tokenize(_SENTINEL + " " + chunk + " " + _SENTINEL)[1:-1])
        if len(self) < 2_000_000:
            self[chunk] = out
        return out


class ChunkTokenizer:
    """Memoised Treebank tokenisation of whitespace chunks (equivalent to tokenising the whole)."""

    def __init__(self, max_cache: int = 2_000_000) -> None:
        self._cache: dict[tuple[str, int], tuple[str, ...]] = {}
        self._mid = _MiddleCache()
        self.max_cache = max_cache

    def _chunk(self, chunk: str, where: int) -> tuple[str, ...]:
        # where: 0 middle, 1 first, 2 last, 3 only chunk
        key = (chunk, where)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        if where == 3:
            toks = _TB.tokenize(chunk)
        elif where == 1:
            toks = _TB.tokenize(chunk + " " + _SENTINEL)[:-1]
        elif where == 2:
            toks = _TB.tokenize(_SENTINEL + " " + chunk)[1:]
        else:
            toks = _TB.tokenize(_SENTINEL + " " + chunk + " " + _SENTINEL)[1:-1]
        out = tuple(toks)
        if len(self._cache) < self.max_cache:
            self._cache[key] = out
        return out

    def __call__(self, text: str) -> list[str]:
        """Tokens of one caption (lowercased)."""
        chunks = text.lower().split()
        n = len(chunks)
        if n == 0:
            return []
        if n == 1:
            return list(self._chunk(chunks[0], 3))
        mid = self._mid
        out = list(self._chunk(chunks[0], 1))
        for c in chunks[1:-1]:
            out += mid[c]
        out += self._chunk(chunks[-1], 2)
        return out


_DEFAULT = ChunkTokenizer()


def tokenize(text: str) -> list[str]:
    """Lowercase + Treebank word tokens of one caption."""
    return _DEFAULT(text)


def tokenize_reference(text: str) -> list[str]:
    """The slow reference: nltk's tokenizer on the whole lowercased string."""
    return _TB.tokenize(text.lower())


def _tokenize_list(texts: list[str]) -> list[list[str]]:
    tok = _DEFAULT
    return [tok(t) for t in texts]


def tokenize_all(texts: Iterable[str], processes: int = 1, chunk: int = 20000) -> list[list[str]]:
    """Tokens of every caption, in order (``processes`` > 1: forked workers, each with its own memo)."""
    texts = list(texts)
    if processes <= 1 or len(texts) < 4 * chunk:
        return _tokenize_list(texts)
    parts = [texts[i:i + chunk] for i in range(0, len(texts), chunk)]
    with mp.get_context("fork").Pool(processes) as pool:
        return [toks for part in pool.imap(_tokenize_list, parts) for toks in part]
