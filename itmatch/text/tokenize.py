"""Caption tokenisation: lowercase + nltk's Penn-Treebank word tokenizer (no ``punkt`` needed).

``tokenize(text)`` is exactly ``TreebankWordTokenizer().tokenize(text.lower())``, but fast: the
Treebank rules are local to a whitespace-separated chunk except at the start and the end of the
string, so every distinct chunk is tokenised once per position (first / middle / last / only) and
memoised; plain ``word``, ``word,`` and final ``word.`` chunks skip the regexes altogether. Caption
corpora reuse few distinct chunks, so all of COCO's 616k captions take seconds (README, "Text
stages"). ``tests/test_text_tokens.py`` checks the equivalence against nltk on tricky strings
(quotes, contractions, final periods, commas in numbers, brackets) and random combinations.

SCAN's own tokenisation (``vocab.py`` line 80–81, ``data.py`` line 57–58 of kuanghuei/SCAN) is nltk's
``word_tokenize`` of the lowercased caption, which first splits sentences with the ``punkt`` model and then
tokenises each sentence. ``punkt`` is data, not code, and often absent offline: :func:`tokenize_all` with
``sentences=True`` uses it when :func:`punkt_available` says it is installed, and the whole-caption Treebank
tokenisation otherwise. The two differ only on captions with a sentence end inside them (a period that is not a
known abbreviation's, followed by more words): 3 of SCAN's 5000 Flickr30K test captions, 3 of its 5070 dev
captions, 5 of COCO's 25000 ``testall`` captions (docs/precomp.md, "Tokens and vocabulary")."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Iterable
from itertools import chain

from nltk.tokenize import TreebankWordTokenizer

_TB = TreebankWordTokenizer()
_SENTINEL = "x"  # a plain word: the Treebank rules see it as ordinary surrounding text


# whole words the Treebank contraction rules split ("cannot" → "can not", "gonna" → "gon na", …)
_SPLIT_WORDS = frozenset({"cannot", "gimme", "gonna", "gotta", "lemme", "wanna"})


def _fast(chunk: str) -> tuple[str, ...] | None:
    """Tokens of the commonest chunks without running the regexes: ``word``, ``word,`` and ``word.``
    (the latter only valid at the end of a caption); None for anything else."""
    if chunk.isascii():
        if chunk.isalnum():
            return None if chunk in _SPLIT_WORDS else (chunk,)
        last, stem = chunk[-1], chunk[:-1]
        if last in ",." and stem.isalnum() and stem not in _SPLIT_WORDS:
            return (stem, last)
    return None


class _ChunkCache(dict):
    """chunk → its tokens at one position of a caption (filled on first use).

    ``where``: 0 middle, 1 first (of several), 2 last (of several), 3 the only chunk.
    """

    def __init__(self, where: int, max_size: int = 2_000_000) -> None:
        super().__init__()
        self.where, self.max_size = where, max_size

    def __missing__(self, chunk: str) -> tuple[str, ...]:
        where = self.where
        fast = _fast(chunk)
        if fast is not None and (fast[-1] != "." or where >= 2):
            out = fast
        elif where == 3:
            out = tuple(_TB.tokenize(chunk))
        elif where == 1:
            out = tuple(_TB.tokenize(chunk + " " + _SENTINEL)[:-1])
        elif where == 2:
            out = tuple(_TB.tokenize(_SENTINEL + " " + chunk)[1:])
        else:
            out = tuple(_TB.tokenize(_SENTINEL + " " + chunk + " " + _SENTINEL)[1:-1])
        if len(self) < self.max_size:
            self[chunk] = out
        return out


class ChunkTokenizer:
    """Memoised Treebank tokenisation of whitespace chunks (equivalent to tokenising the whole)."""

    def __init__(self) -> None:
        self.mid, self.first, self.last, self.only = (_ChunkCache(w) for w in range(4))

    def __call__(self, text: str) -> list[str]:
        """Tokens of one caption (lowercased)."""
        c = text.lower().split()
        if len(c) > 1:
            return [*self.first[c[0]], *chain.from_iterable(map(self.mid.__getitem__, c[1:-1])),
                    *self.last[c[-1]]]
        return list(self.only[c[0]]) if c else []


_DEFAULT = ChunkTokenizer()


def tokenize(text: str) -> list[str]:
    """Lowercase + Treebank word tokens of one caption."""
    return _DEFAULT(text)


def punkt_available() -> bool:
    """Whether nltk's ``punkt`` sentence model (``punkt_tab``, read by ``word_tokenize``) is installed."""
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
    except LookupError:
        return False
    return True


def tokenize_sentences(text: str) -> list[str]:
    """SCAN's tokenisation: nltk's ``word_tokenize`` (punkt sentences, then words) of the lowercased caption."""
    from nltk.tokenize import word_tokenize

    return word_tokenize(text.lower())


def tokenize_reference(text: str) -> list[str]:
    """The slow reference: nltk's tokenizer on the whole lowercased string."""
    return _TB.tokenize(text.lower())


def _tokenize_list(texts: list[str]) -> list[list[str]]:
    tok = _DEFAULT
    return [tok(t) for t in texts]


def tokenize_all(texts: Iterable[str], processes: int = 1, chunk: int = 20000, sentences: bool = False
                 ) -> list[list[str]]:
    """Tokens of every caption, in order (``processes`` > 1: forked workers, each with its own memo).

    ``sentences``: SCAN's tokenisation (:func:`tokenize_sentences`) when punkt is installed; without punkt the
    whole-caption Treebank tokens (the caller logs which one ran)."""
    texts = list(texts)
    if sentences and punkt_available():
        return [tokenize_sentences(t) for t in texts]
    if processes <= 1 or len(texts) < 4 * chunk:
        return _tokenize_list(texts)
    parts = [texts[i:i + chunk] for i in range(0, len(texts), chunk)]
    with mp.get_context("fork").Pool(processes) as pool:
        return [toks for part in pool.imap(_tokenize_list, parts) for toks in part]
