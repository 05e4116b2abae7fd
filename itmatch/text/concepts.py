"""Consensus-aware concepts (CVSE, Wang et al. ECCV 2020; SMFEA §3.2.3 takes V^C / S^C from it): the concept
vocabulary, each caption's concept labels and the concept correlation graph → ``concepts.h5``.

Read from CVSE's released code (github.com/BruceW91/CVSE, commit 94c2191; read, not copied):

1. **Tags and lemmas** of every caption word, from the source the referral trees use (``text.trees.parser``):
   the dataset JSON's gold parse leaves and lemmas (``shapes``) or stanza's ``tokenize,pos,lemma``
   (:func:`itmatch.text.parsers.stanza_tags`; COCO / Flickr30K). CVSE lemmatises with nltk's WordNet
   lemmatizer (data.py lines 22–23, 97, 283) and its concept list is split by part of speech; nltk's WordNet
   and tagger data are not installed here (``nltk.data.find('corpora/wordnet')`` and
   ``taggers/averaged_perceptron_tagger[_eng]`` fail, and nothing may be downloaded at run time), so the tags
   and lemmas come from the same tools as SMFEA's referral trees. Choice written down in docs/text.md.
2. **Vocabulary** (:func:`select_concepts`): lemmas of nouns (NN*), adjectives (JJ*) and verbs (VB*) of the
   **train** captions, counted once per caption; a lemma seen with several classes belongs to the one it has
   most often (ties: noun, adjective, verb). The most frequent ``round(share · num_concepts)`` of each class
   are kept, nouns first, then adjectives, then verbs, each by decreasing count then alphabetically; a class
   with fewer lemmas keeps all it has (so a small vocabulary such as ``shapes``'s caps the number of concepts).
   ``num_concepts`` = 300 (train_f30k.py line 86 / train_coco.py line 91, ``--num_attribute 300``); the shares
   0.7 / 0.2 / 0.1 are those of CVSE's released concept lists (data/*_annotations/Concept_annotations_*/
   category_concepts.json, f30k and coco alike: entries 0–209 nouns, 210–269 adjectives, 270–299 verbs).
3. **Labels** (:func:`caption_concepts`): a caption has concept k when one of its lemmas is concept k's lemma,
   whatever its tag there (data.py lines 280–289 match lemmas to the concept names, no tag).
4. **Co-occurrence** (:func:`cooccurrence`): ``counts[i]`` = train captions with concept i, ``cooccurrence[i, j]``
   = train captions with both (i ≠ j, zero diagonal): the ``nums`` and ``adj_all`` of CVSE's released
   f30k_adj_concepts.pkl (symmetric, zero diagonal, ``nums['man']`` = 41778 > the 31,014 Flickr30K images, so
   counted per caption, not per image).
5. **Correlation graph** (:func:`correlation_matrix`): util/util_C_GCN.py ``gen_A_concept`` for ``adj_all`` in
   the ``'Complex'`` mode CVSE trains with (model_CVSE.py lines 691–692, ``t=0.3``):
   conditional probability ``P[i, j] = cooccurrence[i, j] / counts[i]`` (line 90, P(C_j | C_i)); rescaling
   ``f(P) = s^(P − p) − s^(−p)`` with s = 5, p = 0.02 (lines 103 and 114–124, against the long tail);
   binarisation at the threshold t (``A = f(P) ≥ t``, lines 104–105); re-weighting ``A · w / (column sum + 1e-6)``
   with w = 0.25 (line 106); plus the identity (line 107). The model normalises it as
   ``D^(−1/2) Aᵀ D^(−1/2)`` with D the row sums (``gen_adj``, lines 128–132), see
   :mod:`itmatch.models.concepts`.

``concepts.h5`` (artifact contract): ``names`` [K] (lemmas), ``pos`` [K] (noun | adjective | verb), ``counts``
int64 [K], ``cooccurrence`` int64 [K, K], ``conditional`` float32 [K, K], ``correlation`` float32 [K, K] (step 5,
before the normalisation), ``caption_id`` int64 [C] (row order of captions.parquet), ``label_offsets`` int64
[C+1] and ``label_index`` int16 [L]: caption i's concepts are ``label_index[label_offsets[i]:label_offsets[i+1]]``
(ascending). Attributes: the settings (JSON) and ``source`` (the parser).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from itmatch.config import load_schema, schema_defaults
from itmatch.text.captions import read_captions
from itmatch.text.parsers import gold_parses, stanza_tags
from itmatch.text.trees import Leaf, Phrase, parse_ptb
from itmatch.utils.h5 import checksum
from itmatch.utils.io import atomic_path
from itmatch.utils.logs import log

POS_CLASSES = ("noun", "adjective", "verb")      # the order of CVSE's concept lists
_TAG_PREFIX = {"NN": "noun", "JJ": "adjective", "VB": "verb"}
_WORD = re.compile(r"[a-z][a-z\-']*$")


def concept_defaults() -> dict[str, Any]:
    """The schema's defaults of ``text.concepts`` (the one home of these settings' values)."""
    return schema_defaults("concepts", load_schema()["properties"]["text"])


def pos_class(tag: str) -> str | None:
    """Penn-Treebank tag → ``noun`` | ``adjective`` | ``verb`` | None."""
    return _TAG_PREFIX.get(tag[:2])


def _leaves(node: Phrase | Leaf) -> Iterable[Leaf]:
    if isinstance(node, Leaf):
        yield node
    else:
        for child in node.children:
            yield from _leaves(child)


def gold_tags(ptb: str, lemmas: Sequence[str]) -> list[tuple[str, str]]:
    """``[(tag, lemma), …]`` of a gold parse's leaves."""
    return [(leaf.tag, leaf.lemma) for leaf in _leaves(parse_ptb(ptb, lemmas))]


def select_concepts(tagged: Iterable[Sequence[tuple[str, str]]], num_concepts: int,
                    pos_shares: dict[str, float]) -> tuple[list[str], list[str], list[int]]:
    """The concept vocabulary from tagged train captions (step 2 of the module docstring) →
    (lemmas, classes, caption counts), nouns first, then adjectives, then verbs."""
    unknown = set(pos_shares) - set(POS_CLASSES)
    if unknown:
        raise ValueError(f"text.concepts.pos_shares: unknown classes {sorted(unknown)} (known: {POS_CLASSES})")
    by_class: dict[str, Counter[str]] = {c: Counter() for c in POS_CLASSES}
    for caption in tagged:
        seen = {(pos_class(tag), lemma) for tag, lemma in caption if pos_class(tag) and _WORD.match(lemma)}
        for cls, lemma in seen:
            by_class[cls][lemma] += 1
    owner: dict[str, str] = {}
    for lemma in set().union(*by_class.values()):
        owner[lemma] = max(POS_CLASSES, key=lambda c: (by_class[c][lemma], -POS_CLASSES.index(c)))
    names, classes, counts = [], [], []
    for cls in POS_CLASSES:
        quota = int(round(float(pos_shares.get(cls, 0.0)) * num_concepts))
        mine = sorted(((n, w) for w, n in by_class[cls].items() if owner[w] == cls), key=lambda x: (-x[0], x[1]))
        for n, w in mine[:quota]:
            names.append(w)
            classes.append(cls)
            counts.append(n)
    return names, classes, counts


def caption_concepts(lemmas: Iterable[str], index: dict[str, int]) -> list[int]:
    """Ascending concept ids of a caption's lemmas (step 3)."""
    return sorted({index[w] for w in lemmas if w in index})


def cooccurrence(labels: Iterable[Sequence[int]], num: int) -> tuple[np.ndarray, np.ndarray]:
    """(counts [K], cooccurrence [K, K]) of concept label lists (step 4): captions with concept i, with i and j
    (i ≠ j; zero diagonal)."""
    counts = np.zeros(num, dtype=np.int64)
    co = np.zeros((num, num), dtype=np.int64)
    for lab in labels:
        ids = np.asarray(lab, dtype=np.int64)
        counts[ids] += 1
        co[np.ix_(ids, ids)] += 1
    np.fill_diagonal(co, 0)
    return counts, co


def conditional_probability(co: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """P[i, j] = P(C_j | C_i) = co[i, j] / counts[i] (util_C_GCN.py line 90; 0 for a concept never seen)."""
    return np.divide(co, counts[:, None], out=np.zeros(co.shape, dtype=np.float64), where=counts[:, None] > 0)


def correlation_matrix(co: np.ndarray, counts: np.ndarray, threshold: float, rescale_base: float,
                       rescale_offset: float, reweight: float) -> np.ndarray:
    """CVSE's concept correlation matrix (step 5; util_C_GCN.py ``gen_A_concept``, ``adj_all``, mode 'Complex')."""
    p = conditional_probability(co, counts)
    a = np.power(rescale_base, p - rescale_offset) - np.power(rescale_base, -rescale_offset)   # line 103
    a = (a >= threshold).astype(np.float64)                                                     # lines 104–105
    a = a * reweight / (a.sum(0, keepdims=True) + 1e-6)                                         # line 106
    return a + np.identity(len(counts))                                                          # line 107


def _settings(settings: dict[str, Any] | None) -> dict[str, Any]:
    s = {**concept_defaults(), **(settings or {})}
    unknown = set(s) - set(concept_defaults())
    if unknown:
        raise ValueError(f"text.concepts: unknown keys {sorted(unknown)}")
    if int(s["num_concepts"]) < 2:
        raise ValueError(f"text.concepts.num_concepts must be >= 2, got {s['num_concepts']}")
    return s


def build_concepts(tagged: Sequence[Sequence[tuple[str, str]]], train: np.ndarray,
                   settings: dict[str, Any] | None = None, where: str = "captions") -> dict[str, Any]:
    """Steps 2–5 on tagged captions (one ``[(tag, lemma), …]`` per caption) with their train mask → the arrays of
    concepts.h5: ``names``, ``pos``, ``counts``, ``cooccurrence``, ``conditional``, ``correlation``, ``labels``
    (ascending concept ids per caption) and the resolved ``settings``."""
    s = _settings(settings)
    train = np.asarray(train, dtype=bool)
    if len(train) != len(tagged):
        raise ValueError(f"{where}: {len(tagged)} tagged captions, {len(train)} split flags")
    if not train.any():
        raise ValueError(f"{where}: no train captions to choose concepts from")
    names, classes, _ = select_concepts((t for t, tr in zip(tagged, train, strict=True) if tr),
                                        int(s["num_concepts"]), s["pos_shares"])
    if len(names) < 2:
        raise ValueError(f"{where}: only {len(names)} concept(s) among the train captions' nouns, adjectives and "
                         "verbs (the graph needs at least 2)")
    index = {w: k for k, w in enumerate(names)}
    labels = [caption_concepts((lemma for _, lemma in t), index) for t in tagged]
    counts, co = cooccurrence((lab for lab, tr in zip(labels, train, strict=True) if tr), len(names))
    corr = correlation_matrix(co, counts, float(s["threshold"]), float(s["rescale_base"]),
                              float(s["rescale_offset"]), float(s["reweight"]))
    return {"names": names, "pos": classes, "counts": counts, "cooccurrence": co,
            "conditional": conditional_probability(co, counts), "correlation": corr, "labels": labels,
            "settings": s}


def write_concepts(out: str | Path, caption_ids: Sequence[int], built: dict[str, Any], source: str) -> None:
    """concepts.h5 (layout in the module docstring), written atomically, from :func:`build_concepts`'s result."""
    labels = built["labels"]
    if len(caption_ids) != len(labels):
        raise ValueError(f"{out}: {len(caption_ids)} caption ids for {len(labels)} label lists")
    offsets = np.concatenate([[0], np.cumsum([len(lab) for lab in labels])]).astype(np.int64)
    flat = np.fromiter((k for lab in labels for k in lab), dtype=np.int16, count=int(offsets[-1]))
    K, C = len(built["names"]), len(labels)
    str_t = h5py.string_dtype()
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("names", data=np.array(built["names"], dtype=object), dtype=str_t)
        f.create_dataset("pos", data=np.array(built["pos"], dtype=object), dtype=str_t)
        f.create_dataset("counts", data=built["counts"].astype(np.int64), **checksum((K,)))
        f.create_dataset("cooccurrence", data=built["cooccurrence"].astype(np.int64), **checksum((K, K)))
        f.create_dataset("conditional", data=built["conditional"].astype(np.float32), **checksum((K, K)))
        f.create_dataset("correlation", data=built["correlation"].astype(np.float32), **checksum((K, K)))
        f.create_dataset("caption_id", data=np.asarray(caption_ids, dtype=np.int64), **checksum((C,)))
        f.create_dataset("label_offsets", data=offsets, **checksum((C + 1,)))
        f.create_dataset("label_index", data=flat, **checksum(flat.shape))
        f.attrs["settings"] = json.dumps(built["settings"], sort_keys=True)
        f.attrs["source"] = source


def make_concepts(captions_path: str | Path, out: str | Path, parser: str = "gold", json_path: str | Path | None = None,
                  stanza_dir: str | Path | None = None, stanza_batch_size: int = 256, device: str = "auto",
                  settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Rule ``concepts``: captions.parquet (+ gold parses or stanza) → concepts.h5; returns :func:`build_concepts`'s
    result."""
    caps = read_captions(captions_path)
    if parser == "gold":
        if json_path is None:
            raise ValueError("text.trees.parser 'gold' needs the dataset JSON")
        shared: dict[tuple[str, str], tuple[str, str]] = {}

        def tag(ptb: str, lemmas: list[str]) -> list[tuple[str, str]]:
            return [shared.setdefault(pair, pair) for pair in gold_tags(ptb, lemmas)]

        # tagged as the JSON is read, each (tag, lemma) pair held once: memory ~ a list a caption, not the parses
        tagged = gold_parses(json_path, caps["caption_id"].tolist(), convert=tag)
    elif parser == "stanza":
        if stanza_dir is None:
            raise ValueError("text.trees.parser 'stanza' needs text.trees.stanza_dir")
        tagged = stanza_tags(caps["text"].tolist(), stanza_dir, stanza_batch_size, device)
    else:
        raise ValueError(f"config key text.trees.parser: unknown parser {parser!r} (gold | stanza)")
    train = caps["split"].to_numpy() == "train"
    built = build_concepts(tagged, train, settings, str(captions_path))
    write_concepts(out, caps["caption_id"].to_numpy(), built, parser)
    labels, K = built["labels"], len(built["names"])
    per_class = Counter(built["pos"])
    edges = int((built["correlation"] - np.identity(K) > 0).sum())
    log.info("concepts: %d (%s) from %d train captions; %d graph edges (threshold %.2f); %.2f concepts per "
             "caption, %.0f%% of captions with at least one", K,
             ", ".join(f"{per_class[c]} {c}s" for c in POS_CLASSES), int(train.sum()), edges,
             built["settings"]["threshold"], sum(map(len, labels)) / max(len(labels), 1),
             100 * float(np.mean([len(lab) > 0 for lab in labels])) if labels else 0.0)
    return built
