"""Constituency parses + lemmas for the referral trees.

Two sources give, per caption, ``(ptb, lemmas)``: a Penn-Treebank bracketed tree rooted at ``ROOT``
and one lemma per leaf.

* ``gold``: the ``shapes`` generator stores both for every sentence of its dataset JSON
  (``parse`` and ``lemmas``); matched to captions by ``caption_id`` = the JSON's ``sentid``.
* ``stanza``: stanza's ``tokenize,pos,lemma,constituency`` pipeline, batched, on the GPU when one is
  there (:func:`stanza_tags`: ``tokenize,pos,lemma`` only, for the concept stage). Models are read from a
  local folder (config key ``text.trees.stanza_dir``) and are never downloaded here; a caption that stanza
  splits into several sentences keeps its first sentence (:func:`stanza_tags`: every sentence).

:class:`CaptionParser` gives either source block by block, loading it once (the sharded parse jobs).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from itmatch.utils.device import resolve_device
from itmatch.utils.jsonstream import Unstreamable, stream_array
from itmatch.utils.logs import log, progress

STANZA_PROCESSORS = "tokenize,pos,lemma,constituency"
TAG_PROCESSORS = "tokenize,pos,lemma"   # the concept stage (itmatch.text.concepts): tags and lemmas only
FETCH_COMMAND = "snakemake --cores 1 fetch_stanza_models"


class StanzaModelsMissing(FileNotFoundError):
    """stanza's English models are not in the configured folder."""


def fetch_hint(model_dir: str | Path) -> str:
    return (f"stanza English models not found in {model_dir} (config key text.trees.stanza_dir). "
            f"On a machine with internet access run:  {FETCH_COMMAND}  "
            f"(it runs stanza.download('en', model_dir='{model_dir}', processors='{STANZA_PROCESSORS}')), "
            "or copy an existing stanza_resources folder there.")


def check_stanza_models(model_dir: str | Path) -> Path:
    """The model folder, or :class:`StanzaModelsMissing` naming the config key and the fetch command."""
    d = Path(model_dir)
    if not (d / "resources.json").is_file() or not (d / "en").is_dir():
        raise StanzaModelsMissing(fetch_hint(model_dir))
    return d


def _stanza_pipeline(model_dir: str | Path, processors: str, batch_size: int, device: str) -> tuple[Any, Any]:
    """A stanza English pipeline on the local models of ``model_dir`` (never downloads), and the torch device
    it runs on."""
    d = check_stanza_models(model_dir)
    import stanza

    dev = resolve_device(device, "text.trees.device")  # logged; warns / fails as elsewhere
    extra = {"constituency_batch_size": batch_size} if "constituency" in processors else {}
    return stanza.Pipeline("en", dir=str(d), processors=processors, download_method=None,
                           use_gpu=dev.type == "cuda", logging_level="WARN", tokenize_batch_size=batch_size,
                           pos_batch_size=batch_size * 8, lemma_batch_size=batch_size * 8, **extra), dev


def _stanza_docs(nlp: Any, texts: Sequence[str], batch_size: int, what: str) -> Iterator[Any]:
    """stanza documents of ``texts`` in order, processed ``batch_size`` at a time."""
    import stanza

    starts = range(0, len(texts), batch_size)
    for s in progress(starts, what, len(starts), unit="batch"):
        yield from nlp.bulk_process([stanza.Document([], text=t) for t in texts[s:s + batch_size]])


def _ptb_of(doc: Any) -> tuple[str, list[str]]:
    """``(ptb, lemmas)`` of a stanza document's first sentence (``(ROOT (X))`` for an empty one)."""
    if not doc.sentences:
        return "(ROOT (X))", []
    sent = doc.sentences[0]
    # one-line PTB; a space inside a token (rare) becomes "_" so every leaf stays one word
    return format(sent.constituency, "_O"), [(w.lemma or w.text).lower() for w in sent.words]


def stanza_parse(texts: Sequence[str], model_dir: str | Path, batch_size: int = 256,
                 device: str = "auto") -> list[tuple[str, list[str]]]:
    """``(ptb, lemmas)`` per text with stanza (models from ``model_dir`` only)."""
    nlp, _ = _stanza_pipeline(model_dir, STANZA_PROCESSORS, batch_size, device)
    return [_ptb_of(doc) for doc in _stanza_docs(nlp, texts, batch_size, "stanza parses")]


def stanza_tags(texts: Sequence[str], model_dir: str | Path, batch_size: int = 256,
                device: str = "auto") -> list[list[tuple[str, str]]]:
    """``[(Penn-Treebank tag, lemma), …]`` per text, every sentence of it, with stanza's ``tokenize,pos,lemma``
    (no constituency parser: the concept stage needs tags and lemmas only)."""
    nlp, _ = _stanza_pipeline(model_dir, TAG_PROCESSORS, batch_size, device)
    return [[(w.xpos or "", (w.lemma or w.text).lower()) for sent in doc.sentences for w in sent.words]
            for doc in _stanza_docs(nlp, texts, batch_size, "stanza tags")]


def _gold_index(json_path: str | Path, wanted: Iterable[int] | None = None,
                convert: Callable[[str, list[str]], Any] | None = None) -> dict[int, Any]:
    """``sentid`` → ``(parse, lemmas)`` (or ``convert(parse, lemmas)``) of the sentences of a dataset JSON with gold
    parses: all of them, or only the ``wanted`` ids (the JSON is streamed, so a shard holds only its own parses,
    and a caller that needs less than the parse keeps only that)."""
    keep = None if wanted is None else {int(c) for c in wanted}
    try:
        return _gold_entries(stream_array(Path(json_path), "images"), json_path, keep, convert)
    except Unstreamable:  # another layout: read whole
        with open(json_path, encoding="utf-8") as fh:
            return _gold_entries(json.load(fh).get("images", []), json_path, keep, convert)


def _gold_entries(images: Iterable[dict[str, Any]], json_path: str | Path, keep: set[int] | None,
                  convert: Callable[[str, list[str]], Any] | None = None) -> dict[int, Any]:
    by_id: dict[int, Any] = {}
    for i, img in enumerate(images):
        for j, s in enumerate(img.get("sentences", [])):
            if "parse" not in s or "lemmas" not in s:
                raise ValueError(f"{json_path}: images[{i}].sentences[{j}] has no gold 'parse'/'lemmas' "
                                 "(set text.trees.parser to stanza for this dataset)")
            if keep is None or int(s["sentid"]) in keep:
                lemmas = list(s["lemmas"])
                by_id[int(s["sentid"])] = (s["parse"], lemmas) if convert is None else convert(s["parse"], lemmas)
    return by_id


def _gold_lookup(by_id: dict[int, Any], json_path: str | Path, caption_ids: Sequence[int]) -> list[Any]:
    missing = [c for c in caption_ids if int(c) not in by_id]
    if missing:
        raise ValueError(f"{json_path}: no sentence with sentid {missing[0]} (caption_id of captions.parquet); "
                         f"{len(missing)} caption(s) without a gold parse")
    return [by_id[int(c)] for c in caption_ids]


def gold_parses(json_path: str | Path, caption_ids: Sequence[int],
                convert: Callable[[str, list[str]], Any] | None = None) -> list[Any]:
    """The dataset JSON's own ``(parse, lemmas)`` per caption (``caption_id`` = ``sentid``), or what ``convert``
    makes of each as the JSON is read (only that is held)."""
    out = _gold_lookup(_gold_index(json_path, caption_ids, convert), json_path, caption_ids)
    log.info("gold parses: %d captions from %s", len(caption_ids), json_path)
    return out


_SEP = "\x1f"


def _pack_lemmas(ptb: str, lemmas: list[str]) -> tuple[str, str | tuple[str, ...]]:
    """A gold parse held compactly: its lemmas as one string (a list of ~12 strings costs ~4× more: COCO's
    616k parses held by one shard took 1.6 GB), a tuple where a lemma holds the separator or there are none."""
    if lemmas and not any(_SEP in w for w in lemmas):
        return ptb, _SEP.join(lemmas)
    return ptb, tuple(lemmas)


def _unpack_lemmas(packed: str | tuple[str, ...]) -> list[str]:
    return packed.split(_SEP) if isinstance(packed, str) else list(packed)


class CaptionParser:
    """``(ptb, lemmas)`` of captions, a block at a time, with its source loaded once: the dataset JSON
    (``gold``) or a stanza pipeline (``stanza``, batches of ``batch_size`` from the start of each call).

    ``parser(caption_ids, texts)`` → one ``(ptb, lemmas)`` per caption; ``parser.device``: the torch device
    stanza runs on (``None`` for gold parses). ``caption_ids``: the captions that will be asked for (gold: only
    their parses are kept; None = all)."""

    def __init__(self, parser: str, json_path: str | Path | None = None, stanza_dir: str | Path | None = None,
                 batch_size: int = 256, device: str = "auto", caption_ids: Iterable[int] | None = None):
        self.kind, self.json_path, self.batch_size, self.device = parser, json_path, batch_size, None
        if parser == "gold":
            if json_path is None:
                raise ValueError("text.trees.parser 'gold' needs the dataset JSON")
            self._gold = _gold_index(json_path, caption_ids, _pack_lemmas)
        elif parser == "stanza":
            if stanza_dir is None:
                raise ValueError("text.trees.parser 'stanza' needs text.trees.stanza_dir")
            self._nlp, self.device = _stanza_pipeline(stanza_dir, STANZA_PROCESSORS, batch_size, device)
        else:
            raise ValueError(f"config key text.trees.parser: unknown parser {parser!r} (gold | stanza)")

    def __call__(self, caption_ids: Sequence[int], texts: Sequence[str]) -> list[tuple[str, list[str]]]:
        if self.kind == "gold":
            return [(ptb, _unpack_lemmas(lem)) for ptb, lem in _gold_lookup(self._gold, self.json_path, caption_ids)]
        return [_ptb_of(doc) for doc in _stanza_docs(self._nlp, list(texts), self.batch_size, "stanza parses")]
