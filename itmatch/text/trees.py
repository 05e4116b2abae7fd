"""SMFEA referral trees (§3.2.1): a constituency parse → a fixed 3-layer, 7-node binary tree.

Nodes are numbered in in-order traversal, ``1 2 3 4 5 6 7``::

                 4                 layer 3 (root): relation
            2         6            layer 2:        relations
          1   3     5   7          layer 1:        entities

Leaves 1, 3, 5, 7 are **entities** (a noun, a noun pair "tennis racket" or an adjective–noun pair
"red shirt"), nodes 2, 4, 6 are **relations** (verbs, prepositions, conjunctions, place words).
A node with no content, or whose category is not in the entity/relation dictionary, is ``null``.
The paper builds the tree from the Stanford parser's output and "whitens" the sentence with a POS
tagger and a lemmatiser; it does not spell out the rules, so these are ours:

1. **Input**: a Penn-Treebank bracketed tree (POS tags at the leaves) and one lemma per leaf
   (stanza's lemmas, or the ``shapes`` generator's gold lemmas). Without lemmas: lowercased words,
   with the forms of *be*, *do* and *have* mapped to their lemma.
2. **Whitening** (words that carry nothing are dropped): determiners, numbers, pronouns, ``there``,
   wh-words, modals, possessive markers, punctuation; the verbs ``be`` and ``do``; any verb that is
   an auxiliary (a verb followed by a VP inside its own VP: "is riding", "has been", passives);
   "container" nouns before *of* ("a group of people" → people; also picture, photo, image, view,
   couple, pair, bunch, herd, flock, lot, number, piece, slice, …).
3. **Items**: the parse is read left to right into a chain of items.
   * Entity: each base noun phrase (the run of leaves of an NP before its PP/VP/SBAR/NP modifiers)
     with a noun gives one entity; its head is the last noun, its candidate labels are
     ``"<modifier> <head>"`` (the word just before the head when it is a noun or an adjective, i.e.
     a noun pair or adjective–noun pair) and then ``"<head>"``, in lemmas.
   * Relation: a content verb (its lemma), a preposition / ``to`` / conjunction / particle, an
     adverb of place (left, right, next, behind, near, …), and a noun phrase headed by a *place
     noun* (left, right, top, bottom, middle, center, corner, side, front, back, edge, background,
     foreground, …): "to the left of" → ``left``, "in front of" → ``front``, "in the top left corner"
     → ``top left corner`` (backing off to ``corner``).
   * Consecutive relations merge into one, keeping the strongest: verb > place word > other
     preposition/conjunction > ``of``/``to`` (ties: the first). "sitting on" → ``sit``.
   * Two consecutive entities get a ``null`` relation between them ("a dog, a cat").
4. **Layout**.
   * A clause (S) with a content main verb — found by descending the predicate VP past auxiliaries
     and copulas, taking the first VP of a coordination — puts the verb at the root (node 4), the
     subject noun phrase's chain in the left subtree (1, 2, 3) and what follows the verb in the
     right subtree (5, 6, 7). A preposition right after the verb is dropped ("plays with a ball":
     root ``play``, node 5 ``ball``); a place word is kept ("stands in front of a building":
     5 null, 6 ``front``, 7 ``building``).
   * A noun-phrase caption whose top NP has a participial VP ("A man riding a bike down the
     street.") is laid out the same way, with the NP before the VP as the subject.
   * Everything else — noun-phrase captions without a verb, copulas ("a circle is left of a
     star"), existentials ("there is a circle left of a star") — is read as one chain filled
     left-to-right into ``1 2 3 4 5 6 7`` (so the three phrasings give the same tree).
   * Each subtree takes the first ``entity relation entity`` of its chain; what does not fit is
     dropped; a chain that starts with a relation gets a ``null`` entity first.
5. **Dictionaries** (``build_dictionaries``): every candidate label of every filled node of the
   **train** captions is counted; entities (relations) with at least ``entity_min_count``
   (``relation_min_count``) occurrences are kept, the most frequent ``max_entities``
   (``max_relations``) of them (the paper has 1440 and 247). A node gets its first candidate that
   is in the dictionary, else ``null``.

Output ``trees.parquet``: ``caption_id`` (int64); ``labels`` (list<int32>, length 7, in-order):
nodes 1, 3, 5, 7 index ``tree_vocab.json["entities"]``, nodes 2, 4, 6 index
``tree_vocab.json["relations"]``, ``-1`` = null; ``names`` (list<string>, 7: the chosen dictionary
entry, ``""`` for null) and ``words`` (list<string>, 7: the caption's words behind the node, ``""``
when the node is empty). ``tree_vocab.json``: ``entities``, ``relations`` (lists), their train
``entity_counts``/``relation_counts``, ``null`` = -1, ``node_kinds`` and the settings.

Sharded (the workflow): :func:`parse_shard` writes the parses (the slow part with stanza) of a contiguous run
of whole blocks of captions, resumably, with a captions/s record; :func:`gather_trees` converts them and
builds the dictionaries, writing exactly what the one-job :func:`make_trees` writes.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from itmatch.text.captions import read_captions
from itmatch.text.parsers import CaptionParser
from itmatch.utils.io import write_json, write_parquet
from itmatch.utils.logs import log, progress
from itmatch.utils.resume import ParquetBlocks, fingerprint
from itmatch.utils.shards import block_shard_rows, device_label, shard_record, write_shard_record

NODE_KINDS = ("entity", "relation", "entity", "relation", "entity", "relation", "entity")
ENTITY_NODES = (0, 2, 4, 6)  # 0-based positions of nodes 1, 3, 5, 7
RELATION_NODES = (1, 3, 5)
NULL = -1

EMPTY_VERBS = frozenset({"be", "do"})
LIGHT_RELATIONS = frozenset({"of", "to"})
PLACE_NOUNS = frozenset({"left", "right", "top", "bottom", "middle", "center", "centre", "corner", "side",
                         "front", "back", "rear", "edge", "background", "foreground", "inside",
                         "outside", "end"})
PLACE_MODIFIERS = PLACE_NOUNS | frozenset({"upper", "lower", "far", "near"})
PLACE_ADVERBS = frozenset({"left", "right", "next", "behind", "near", "nearby", "close", "ahead", "beside",
                           "inside", "outside", "above", "below", "beneath", "under", "over", "underneath",
                           "atop", "together", "across", "along", "around", "away", "up", "down"})
CONTAINER_NOUNS = frozenset({"picture", "photo", "photograph", "image", "view", "shot", "closeup", "group",
                             "couple", "pair", "bunch", "herd", "flock", "lot", "number", "variety", "kind",
                             "type", "piece", "slice", "set", "pile", "row", "line", "crowd", "team",
                             "stack", "display", "collection", "assortment"})
STOP_MODIFIERS = frozenset({"other", "many", "several", "few", "some", "various", "different", "same", "own",
                            "such", "certain", "much", "more", "most", "multiple", "numerous", "lots",
                            "each", "all", "both", "another", "only", "very"})
NOUN_TAGS = frozenset({"NN", "NNS", "NNP", "NNPS"})
MODIFIER_TAGS = NOUN_TAGS | frozenset({"JJ", "JJR", "JJS", "VBN", "VBG"})
RUN_BREAKERS = frozenset({"CC", "IN", "TO", ",", ":"})
BASE_PHRASES = frozenset({"ADJP", "NML", "QP", "NX", "NAC"})
CONJ_SKIP = frozenset({"either", "both", "neither"})
PREP_SKIP = frozenset({"that", "whether", "if"})
_WORD = re.compile(r"[a-z][a-z\-']*$")


@dataclass
class Leaf:
    tag: str
    word: str
    lemma: str


@dataclass
class Phrase:
    label: str
    children: list = field(default_factory=list)  # Phrase | Leaf


@dataclass
class Item:
    kind: str  # "E" or "R"
    cands: tuple[str, ...]  # candidate labels, most specific first
    words: str
    prio: int = 0  # relations: 3 verb, 2 place, 1 preposition/conjunction, 0 of/to
    head: str = ""
    src: Leaf | None = None


class NodeLabel(NamedTuple):
    """What labelling a node needs of its :class:`Item` (its candidate labels and words), without the parse."""

    cands: tuple[str, ...]
    words: str


class ParseError(ValueError):
    """A bracketed tree that cannot be read."""


# ----------------------------------------------------------------------------------------------
# reading PTB brackets
# ----------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"\(|\)|[^\s()]+")
_FALLBACK_LEMMAS = {"is": "be", "are": "be", "was": "be", "were": "be", "am": "be", "been": "be",
                    "being": "be", "'s": "be", "'re": "be", "does": "do", "did": "do", "done": "do",
                    "has": "have", "had": "have", "having": "have"}


def parse_ptb(text: str, lemmas: Sequence[str] | None = None) -> Phrase:
    """Read ``(ROOT (S (NP (DT A) (NN man)) ...))``; ``lemmas`` has one entry per leaf (or None)."""
    toks = _TOKEN.findall(text)
    pos = 0
    leaves: list[Leaf] = []

    def node() -> Phrase | Leaf:
        nonlocal pos
        if toks[pos] != "(":
            raise ParseError(f"expected '(' at token {pos} of {text!r}")
        pos += 1
        label = toks[pos] if toks[pos] not in "()" else ""
        if label:
            pos += 1
        if toks[pos] not in "()":  # (TAG word)
            word = toks[pos]
            pos += 1
            if toks[pos] != ")":
                raise ParseError(f"leaf ({label} {word} …) has more than one word in {text!r}")
            pos += 1
            low = word.lower()
            leaf = Leaf(label, word, _FALLBACK_LEMMAS.get(low, low) if label.startswith("VB") else low)
            leaves.append(leaf)
            return leaf
        children = []
        while toks[pos] == "(":
            children.append(node())
        if toks[pos] != ")":
            raise ParseError(f"unbalanced brackets in {text!r}")
        pos += 1
        return Phrase(label, children)

    try:
        tree = node()
    except IndexError as e:
        raise ParseError(f"unbalanced brackets in {text!r}") from e
    if pos != len(toks):
        raise ParseError(f"trailing text after the tree in {text!r}")
    if isinstance(tree, Leaf):
        tree = Phrase("ROOT", [tree])
    if lemmas is not None:
        if len(lemmas) != len(leaves):
            raise ParseError(f"{len(lemmas)} lemmas for {len(leaves)} leaves in {text!r}")
        for leaf, lem in zip(leaves, lemmas, strict=True):
            leaf.lemma = (lem or leaf.word).lower()
    return tree


# ----------------------------------------------------------------------------------------------
# items
# ----------------------------------------------------------------------------------------------

def _relation_leaf(leaf: Leaf) -> Item | None:
    t, lem, w = leaf.tag, leaf.lemma, leaf.word.lower()
    if t.startswith("VB"):
        if lem in EMPTY_VERBS:
            return None
        return Item("R", (lem,), w, 3, lem, leaf)
    if t in ("IN", "TO"):
        if w in PREP_SKIP:
            return None
        if w in PLACE_ADVERBS and w not in ("up", "down", "over", "under", "above", "below"):
            return Item("R", (w,), w, 2, w, leaf)
        return Item("R", (w,), w, 0 if w in LIGHT_RELATIONS else 1, w, leaf)
    if t == "CC":
        return None if w in CONJ_SKIP else Item("R", (w,), w, 1, w, leaf)
    if t == "RP":
        return Item("R", (w,), w, 1, w, leaf)
    if t.startswith(("RB", "JJ")) and lem in PLACE_ADVERBS:
        return Item("R", (lem,), w, 2, lem, leaf)
    return None


def _base_item(leaves: list[Leaf]) -> Item | None:
    """The entity (or place relation) of a base noun phrase's leaves."""
    nouns = [i for i, lf in enumerate(leaves) if lf.tag in NOUN_TAGS and _WORD.match(lf.lemma)]
    content = " ".join(lf.word.lower() for lf in leaves if lf.tag in MODIFIER_TAGS or lf.tag in NOUN_TAGS)
    if not nouns:
        place = [lf.lemma for lf in leaves if lf.lemma in PLACE_NOUNS and lf.tag.startswith(("JJ", "RB"))]
        if place:  # "the left" tagged as an adjective
            return Item("R", (" ".join(place), place[-1]), content, 2, place[-1])
        return None
    h = nouns[-1]
    head = leaves[h].lemma
    if head in PLACE_NOUNS:
        place = [lf.lemma for lf in leaves[:h + 1] if lf.lemma in PLACE_MODIFIERS]
        full = " ".join(place)
        return Item("R", (full, head) if full != head else (head,), content, 2, head)
    cands: tuple[str, ...] = (head,)
    if h > 0:
        m = leaves[h - 1]
        if m.tag in MODIFIER_TAGS and m.lemma not in STOP_MODIFIERS and _WORD.match(m.lemma):
            cands = (f"{m.lemma} {head}", head)
    return Item("E", cands, content, 0, head)


def _flatten(node: Phrase | Leaf) -> list[Leaf]:
    if isinstance(node, Leaf):
        return [node]
    return [lf for c in node.children for lf in _flatten(c)]


def chain(node: Phrase | Leaf) -> list[Item]:
    """Items of a subtree, left to right (rule 3)."""
    if isinstance(node, Leaf):
        if node.tag in NOUN_TAGS and _WORD.match(node.lemma):
            return [it for it in [_base_item([node])] if it]
        it = _relation_leaf(node)
        return [it] if it else []
    if node.label in ("NP", "NX", "NML") and node.children:
        out: list[Item] = []
        run: list[Leaf] = []
        for c in node.children:
            if isinstance(c, Leaf) and c.tag in RUN_BREAKERS:  # "a dog and a cat", "a dog, a cat"
                if run:
                    out += [it for it in [_base_item(run)] if it]
                    run = []
                out += chain(c)
                continue
            if isinstance(c, Leaf) or c.label in BASE_PHRASES:
                run.extend(_flatten(c))
                continue
            if run:
                out += [it for it in [_base_item(run)] if it]
                run = []
            out += chain(c)
        if run:
            out += [it for it in [_base_item(run)] if it]
        return out
    if node.label.startswith("WH"):
        return []
    return [it for c in node.children for it in chain(c)]


# ----------------------------------------------------------------------------------------------
# layout
# ----------------------------------------------------------------------------------------------

def _normalise(items: list[Item], leading: str) -> list[Item | None]:
    """Alternating ``E R E R …`` (rule 3: containers, merging, null fillers)."""
    kept: list[Item] = []
    i = 0
    while i < len(items):  # "a group of people" → people
        it = items[i]
        if (it.kind == "E" and it.head in CONTAINER_NOUNS and i + 1 < len(items)
                and items[i + 1].kind == "R" and items[i + 1].head == "of"):
            i += 2
            continue
        kept.append(it)
        i += 1
    merged: list[Item] = []
    for it in kept:
        if it.kind == "R" and merged and merged[-1].kind == "R":
            prev = merged[-1]
            best = it if it.prio > prev.prio else prev
            merged[-1] = Item("R", best.cands, f"{prev.words} {it.words}", best.prio, best.head, best.src)
        else:
            merged.append(it)
    out: list[Item | None] = []
    for it in merged:
        if not out:
            if it.kind == "R":
                if leading == "drop" and it.prio < 2:
                    continue
                out.append(None)
            out.append(it)
            continue
        if (out[-1] is None or out[-1].kind == "E") and it.kind == "E" and len(out) % 2 == 1:
            out.append(None)
        out.append(it)
    return out


def _pack(items: list[Item | None], n: int) -> list[Item | None]:
    return (items + [None] * n)[:n]


def _is_verb_phrase(node: Phrase | Leaf) -> bool:
    return isinstance(node, Phrase) and node.label == "VP"


def main_verb(vp: Phrase) -> Leaf | None:
    """The content verb of a predicate: past auxiliaries/copulas, into the first VP of a coordination."""
    sub_vps = [c for c in vp.children if _is_verb_phrase(c)]
    for c in vp.children:
        if _is_verb_phrase(c):
            break
        if isinstance(c, Leaf) and c.tag.startswith("VB"):
            if sub_vps or c.lemma in EMPTY_VERBS:
                continue  # auxiliary or copula
            return c
    return main_verb(sub_vps[0]) if sub_vps else None


def _verb_layout(subject: list[Item], predicate: Phrase | list, verb: Leaf) -> list[Item | None]:
    pred = chain(predicate) if isinstance(predicate, Phrase) else predicate
    idx = next((i for i, it in enumerate(pred) if it.src is verb), None)
    after = pred[idx + 1:] if idx is not None else pred
    verb_item = Item("R", (verb.lemma,), verb.word.lower(), 3, verb.lemma, verb)
    return (_pack(_normalise(subject, "null"), 3) + [verb_item]
            + _pack(_normalise(after, "drop"), 3))


def _strip_root(tree: Phrase) -> Phrase | Leaf:
    node: Phrase | Leaf = tree
    while isinstance(node, Phrase) and node.label in ("ROOT", "TOP", "") and len(node.children) == 1:
        node = node.children[0]
    return node


def _np_layout(np_: Phrase) -> list[Item | None]:
    """A noun-phrase caption: participial predicate → verb layout, else one chain."""
    kids = np_.children
    for k, c in enumerate(kids):
        if _is_verb_phrase(c) and k > 0 and any(isinstance(x, Phrase) and x.label == "NP" for x in kids[:k]):
            verb = main_verb(c)
            if verb is not None:
                subject = [it for x in kids[:k] for it in chain(x)]
                return _verb_layout(subject, c, verb)
            break
    return _pack(_normalise(chain(np_), "null"), 7)


def layout(tree: Phrase) -> list[Item | None]:
    """The 7 in-order nodes (rule 4) of a parsed caption (``None`` = empty node)."""
    top = _strip_root(tree)
    if isinstance(top, Leaf):
        return _pack(_normalise(chain(top), "null"), 7)
    while top.label in ("S", "SINV", "SQ") and not any(_is_verb_phrase(c) for c in top.children):
        subs = [c for c in top.children if isinstance(c, Phrase) and c.label in ("S", "SINV", "SQ")]
        if not subs:
            break
        top = subs[0]  # coordinated clauses: the first
    if top.label in ("S", "SINV", "SQ"):
        vp_i = next((i for i, c in enumerate(top.children) if _is_verb_phrase(c)), None)
        if vp_i is None:
            return _pack(_normalise(chain(top), "null"), 7)
        vp = top.children[vp_i]
        subj_nodes = [c for c in top.children[:vp_i] if isinstance(c, Phrase) and c.label == "NP"]
        subject = chain(subj_nodes[-1]) if subj_nodes else []
        verb = main_verb(vp)
        if verb is not None:
            return _verb_layout(subject, vp, verb)
        existential = bool(subj_nodes) and all(lf.tag == "EX" for lf in _flatten(subj_nodes[-1]))
        if existential:  # there is / are NP …: read the NP as a caption
            nps = [c for c in _descend_copula(vp) if isinstance(c, Phrase) and c.label == "NP"]
            if nps:
                return _np_layout(nps[0])
        return _pack(_normalise(subject + chain(vp), "null"), 7)
    if top.label != "NP":  # FRAG, X, UCP …: the NP inside when there is exactly one
        nps = [c for c in top.children if isinstance(c, Phrase) and c.label == "NP"]
        if len(nps) == 1 and all(isinstance(c, Leaf) or c is nps[0] for c in top.children):
            top = nps[0]
        else:
            return _pack(_normalise(chain(top), "null"), 7)
    return _np_layout(top)


def _descend_copula(vp: Phrase) -> list:
    sub = [c for c in vp.children if _is_verb_phrase(c)]
    return _descend_copula(sub[0]) if sub else vp.children


# ----------------------------------------------------------------------------------------------
# dictionaries and labels
# ----------------------------------------------------------------------------------------------

@dataclass
class TreeVocab:
    entities: list[str]
    relations: list[str]
    entity_counts: dict[str, int] = field(default_factory=dict)
    relation_counts: dict[str, int] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.entity_index = {e: i for i, e in enumerate(self.entities)}
        self.relation_index = {r: i for i, r in enumerate(self.relations)}

    def label(self, pos: int, item: Item | NodeLabel | None) -> tuple[int, str]:
        """(id, name) of node ``pos`` (0-based), ``(-1, "")`` for null."""
        if item is None:
            return NULL, ""
        index = self.entity_index if pos in ENTITY_NODES else self.relation_index
        for c in item.cands:
            if c in index:
                return index[c], c
        return NULL, ""

    def to_json(self) -> dict:
        return {"entities": self.entities, "relations": self.relations, "null": NULL,
                "node_kinds": list(NODE_KINDS), "entity_counts": self.entity_counts,
                "relation_counts": self.relation_counts, "settings": self.settings}

    @classmethod
    def from_json(cls, d: dict) -> TreeVocab:
        return cls(d["entities"], d["relations"], d.get("entity_counts", {}), d.get("relation_counts", {}),
                   d.get("settings", {}))


def build_dictionaries(trees: Sequence[Sequence[Item | NodeLabel | None]], entity_min_count: int = 5,
                       relation_min_count: int = 5, max_entities: int = 1440,
                       max_relations: int = 247) -> TreeVocab:
    """Entity and relation dictionaries from (train) node items (rule 5)."""
    ent: Counter[str] = Counter()
    rel: Counter[str] = Counter()
    for nodes in trees:
        for pos, it in enumerate(nodes):
            if it is not None:
                (ent if pos in ENTITY_NODES else rel).update(it.cands)
    return _dictionaries(ent, rel, entity_min_count, relation_min_count, max_entities, max_relations)


def _dictionaries(ent: Counter[str], rel: Counter[str], entity_min_count: int, relation_min_count: int,
                  max_entities: int, max_relations: int) -> TreeVocab:
    def top(c: Counter[str], k: int, n: int) -> list[str]:
        return sorted((w for w, m in c.items() if m >= k), key=lambda w: (-c[w], w))[:n]

    entities, relations = top(ent, entity_min_count, max_entities), top(rel, relation_min_count, max_relations)
    return TreeVocab(entities, relations, {e: ent[e] for e in entities}, {r: rel[r] for r in relations},
                     {"entity_min_count": entity_min_count, "relation_min_count": relation_min_count,
                      "max_entities": max_entities, "max_relations": max_relations})


def tree_nodes(ptb: str, lemmas: Sequence[str] | None = None) -> list[Item | None]:
    """Parse + layout of one caption."""
    return layout(parse_ptb(ptb, lemmas))


# ----------------------------------------------------------------------------------------------
# the rule
# ----------------------------------------------------------------------------------------------

def trees_table(caption_ids, node_ids: np.ndarray, nodes: Sequence[NodeLabel], vocab: TreeVocab):
    """``trees.parquet`` as an Arrow table (see the module docstring) from each caption's 7 node ids
    (``node_ids`` [C, 7], -1 = null) into the distinct node labels ``nodes``."""
    C, K = len(node_ids), len(nodes)
    # (label id, name) of every distinct node as an entity and as a relation (the label depends only on the kind)
    entity = [vocab.label(ENTITY_NODES[0], lab) for lab in nodes]
    relation = [vocab.label(RELATION_NODES[0], lab) for lab in nodes]
    label_of = {True: np.array([k for k, _ in entity], dtype=np.int32),
                False: np.array([k for k, _ in relation], dtype=np.int32)}
    # the names / words of a row's nodes index one string table: entity names, relation names, words, ""
    strings = pa.array([n for _, n in entity] + [n for _, n in relation] + [lab.words for lab in nodes] + [""],
                       pa.string())
    labels = np.full((C, 7), NULL, dtype=np.int32)
    name_at = np.full((C, 7), 3 * K, dtype=np.int64)
    word_at = np.full((C, 7), 3 * K, dtype=np.int64)
    for pos in range(7):
        is_entity = pos in ENTITY_NODES
        ids = node_ids[:, pos].astype(np.int64)
        filled = ids >= 0
        labels[filled, pos] = label_of[is_entity][ids[filled]]
        name_at[filled, pos] = ids[filled] + (0 if is_entity else K)
        word_at[filled, pos] = ids[filled] + 2 * K
    off = pa.array(np.arange(0, 7 * C + 1, 7, dtype=np.int32))
    return pa.table({
        "caption_id": pa.array(np.asarray(caption_ids, dtype=np.int64)),
        "labels": pa.ListArray.from_arrays(off, pa.array(labels.reshape(-1))),
        "names": pa.ListArray.from_arrays(off, strings.take(pa.array(name_at.reshape(-1)))),
        "words": pa.ListArray.from_arrays(off, strings.take(pa.array(word_at.reshape(-1)))),
    }), labels


def _write_trees(caps, parses: Iterable[tuple[str, Sequence[str] | None]], parser: str, captions_path,
                 trees_out, vocab_out, entity_min_count: int, relation_min_count: int, max_entities: int,
                 max_relations: int) -> TreeVocab:
    """Trees of every caption from its parse, dictionaries from the train captions → trees.parquet +
    tree_vocab.json.

    Memory follows the distinct node labels, not the captions: a caption keeps 7 ids into the table of distinct
    (candidate labels, words) (an Item refers to its parse tree, ~1 KB a caption)."""
    node_ids = np.full((len(caps), 7), NULL, dtype=np.int32)
    nodes: list[NodeLabel] = []
    id_of: dict[NodeLabel, int] = {}
    for r, (cid, (ptb, lemmas)) in enumerate(progress(zip(caps["caption_id"], parses, strict=True),
                                                      "referral trees", len(caps))):
        try:
            items = tree_nodes(ptb, lemmas)
        except ParseError as e:
            raise ParseError(f"{captions_path}: caption_id {cid}: {e}") from e
        for pos, it in enumerate(items):
            if it is not None:
                lab = NodeLabel(it.cands, it.words)
                k = id_of.setdefault(lab, len(nodes))
                if k == len(nodes):
                    nodes.append(lab)
                node_ids[r, pos] = k
    train = caps["split"].to_numpy() == "train"
    ent: Counter[str] = Counter()
    rel: Counter[str] = Counter()
    for positions, counter in ((ENTITY_NODES, ent), (RELATION_NODES, rel)):
        ids = node_ids[train][:, list(positions)].reshape(-1)
        for k, n in enumerate(np.bincount(ids[ids >= 0], minlength=len(nodes)).tolist()):
            for c in nodes[k].cands if n else ():
                counter[c] += n
    vocab = _dictionaries(ent, rel, entity_min_count, relation_min_count, max_entities, max_relations)
    vocab.settings["parser"] = parser
    table, lab = trees_table(caps["caption_id"].to_numpy(), node_ids, nodes, vocab)
    log.info("referral trees: %d captions, %d entities, %d relations; non-null nodes per position %s",
             len(caps), len(vocab.entities), len(vocab.relations),
             ", ".join(f"{(lab[:, k] >= 0).mean():.2f}" for k in range(7)))
    write_json(vocab_out, vocab.to_json(), indent=None)
    write_parquet(trees_out, table)
    return vocab


def make_trees(captions_path, trees_out, vocab_out, parser: str = "gold", json_path=None,
               stanza_dir=None, stanza_batch_size: int = 256, device: str = "auto",
               entity_min_count: int = 5, relation_min_count: int = 5, max_entities: int = 1440,
               max_relations: int = 247) -> TreeVocab:
    """captions.parquet (+ parses) → trees.parquet + tree_vocab.json in one job; the workflow runs
    :func:`parse_shard` jobs and :func:`gather_trees`, which give the same files."""

    caps = read_captions(captions_path)
    parse = CaptionParser(parser, json_path, stanza_dir, stanza_batch_size, device)
    parses = parse(caps["caption_id"].tolist(), caps["text"].tolist())
    return _write_trees(caps, parses, parser, captions_path, trees_out, vocab_out, entity_min_count,
                        relation_min_count, max_entities, max_relations)


# ----------------------------------------------------------------------------------------------
# sharded: parses per shard (the slow part: stanza), trees + dictionaries in the gather
# ----------------------------------------------------------------------------------------------

PARSE_SCHEMA = pa.schema([("caption_id", pa.int64()), ("ptb", pa.string()), ("lemmas", pa.list_(pa.string()))])
SHARD_META = b"itmatch"
PARSE_READ_BATCH = 16_384  # parses read from a shard file at a time by the gather


def _parse_source(parser: str, json_path, stanza_dir, stanza_batch_size: int) -> list:
    """What the parses of a partial shard depend on besides the captions (its resume key)."""
    if parser == "gold":
        st = os.stat(json_path)
        return [str(json_path), st.st_size, st.st_mtime_ns]
    return [str(stanza_dir), stanza_batch_size]


def parse_shard(captions_path, out, shard: int, n_shards: int, parser: str = "gold", json_path=None,
                stanza_dir=None, stanza_batch_size: int = 256, device: str = "auto", block: int = 4096,
                record_path=None, on_block=None) -> dict:
    """Rule ``referral_trees_shard``: the parses (``caption_id``, ``ptb``, ``lemmas``) of the captions of shard
    ``shard`` of ``n_shards`` → a Parquet shard file.

    The shard covers whole blocks of ``block`` captions counted from row 0
    (:func:`itmatch.utils.shards.block_shard_rows`; with ``block`` a multiple of ``stanza_batch_size`` stanza
    sees the same batches for any shard count). Each block is written atomically to ``<out>.partial/``
    (:class:`itmatch.utils.resume.ParquetBlocks`): a killed job resumes after its last whole block. The
    schema metadata ``itmatch`` holds the rows, the parser and the throughput record (``captions_per_s``,
    ``device``), which is also logged and written to ``record_path`` (JSON). ``on_block(k)`` is called after
    block ``k`` is written (tests interrupt there). Returns the record."""
    out = Path(out)
    caps = read_captions(captions_path)
    start, stop = block_shard_rows(len(caps), block, shard, n_shards)
    ids = caps["caption_id"].to_numpy(np.int64)[start:stop]
    texts = caps["text"].iloc[start:stop].tolist()
    key = fingerprint([parser, _parse_source(parser, json_path, stanza_dir, stanza_batch_size), block, start, stop],
                      ids.tobytes(), "\x1e".join(texts).encode())
    blocks = ParquetBlocks(out.with_name(out.name + ".partial"), key, "partial parse blocks")
    n_blocks = (stop - start + block - 1) // block
    done = blocks.open()
    log.info("referral-tree parses, shard %d/%d: caption rows %d..%d of %s (%d blocks of %d, %d done), parser %s",
             shard + 1, n_shards, start, stop, captions_path, n_blocks, block, done, parser)
    parse = (CaptionParser(parser, json_path, stanza_dir, stanza_batch_size, device, caption_ids=ids[done * block:])
             if done < n_blocks else None)
    t0 = time.perf_counter()
    for k in range(done, n_blocks):
        a, b = k * block, min((k + 1) * block, stop - start)
        got = parse(ids[a:b].tolist(), texts[a:b])
        blocks.write(k, pa.table({"caption_id": pa.array(ids[a:b]), "ptb": pa.array([p for p, _ in got], pa.string()),
                                  "lemmas": pa.array([None if lem is None else list(lem) for _, lem in got],
                                                     pa.list_(pa.string()))}, schema=PARSE_SCHEMA))
        if on_block is not None:
            on_block(k)
    seconds = time.perf_counter() - t0
    table = blocks.read(n_blocks, PARSE_SCHEMA)
    if not np.array_equal(table.column("caption_id").to_numpy(), ids):
        raise RuntimeError(f"{blocks.path}: the blocks do not hold caption rows {start}..{stop}")
    dev = "-" if parse is None else (device_label(parse.device) if parse.device is not None
                                     else f"{parser} parses (no model)")
    record = shard_record("referral_trees", shard, n_shards, (start, stop), min(done * block, stop - start),
                          (stop - start) - min(done * block, stop - start), seconds, dev, parser=parser)
    meta = {"row_start": start, "row_stop": stop, "shard": shard, "n_shards": n_shards, "parser": parser,
            "block": block, "record": record}
    write_parquet(out, table.replace_schema_metadata({SHARD_META: json.dumps(meta).encode()}))
    blocks.discard()
    write_shard_record(record_path, record)
    return record


def shard_meta(path) -> dict:
    """The ``itmatch`` metadata of a parse shard file (rows, parser, throughput record)."""
    meta = pq.read_schema(path).metadata or {}
    if SHARD_META not in meta:
        raise ValueError(f"{path}: not a referral-tree parse shard (no 'itmatch' metadata)")
    return json.loads(meta[SHARD_META])


def gather_trees(shards: Sequence[str | Path], captions_path, trees_out, vocab_out, parser: str = "gold",
                 entity_min_count: int = 5, relation_min_count: int = 5, max_entities: int = 1440,
                 max_relations: int = 247) -> TreeVocab:
    """Rule ``referral_trees``: parse shards (contiguous, complete, the caption ids of captions.parquet) →
    trees + dictionaries (from the train captions) → trees.parquet + tree_vocab.json, the files
    :func:`make_trees` writes."""
    caps = read_captions(captions_path)
    ids = caps["caption_id"].to_numpy(np.int64)
    metas = sorted(((shard_meta(p), str(p)) for p in shards), key=lambda m: (m[0]["row_start"], m[0]["row_stop"]))
    covered = 0
    for meta, name in metas:  # checked before any parse is read
        a, b = meta["row_start"], meta["row_stop"]
        if a != covered:
            raise ValueError(f"{name}: covers caption rows {a}..{b}, expected to start at {covered}")
        if meta["parser"] != parser:
            raise ValueError(f"{name}: parsed with {meta['parser']!r}, text.trees.parser is {parser!r}")
        covered = b
    if covered != len(ids):
        raise ValueError(f"parse shards cover {covered} caption rows, {captions_path} has {len(ids)}")
    log.info("referral trees: %d parse shards gathered", len(metas))

    def parses() -> Iterator[tuple[str, list[str] | None]]:  # a batch of one shard in memory at a time
        for meta, name in metas:
            a, b = meta["row_start"], meta["row_stop"]
            f = pq.ParquetFile(name)
            if f.metadata.num_rows != b - a:
                raise ValueError(f"{name}: {f.metadata.num_rows} parses for caption rows {a}..{b}")
            r = a
            for t in f.iter_batches(batch_size=PARSE_READ_BATCH):
                if not np.array_equal(t.column("caption_id").to_numpy(), ids[r:r + t.num_rows]):
                    raise ValueError(f"{name}: caption ids differ from {captions_path} rows {a}..{b} "
                                     "(captions changed since the shard was parsed?)")
                r += t.num_rows
                yield from zip(t.column("ptb").to_pylist(), t.column("lemmas").to_pylist(), strict=True)

    return _write_trees(caps, parses(), parser, captions_path, trees_out, vocab_out, entity_min_count,
                        relation_min_count, max_entities, max_relations)
