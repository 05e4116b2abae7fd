"""SMFEA referral trees: hand-written parses of ordinary captions, shapes gold parses, dictionaries,
the Parquet layout, and the stanza path without models."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from itmatch.data.shapes import CATEGORIES
from itmatch.text.parsers import StanzaModelsMissing, check_stanza_models
from itmatch.text.trees import (
    ENTITY_NODES,
    ParseError,
    TreeVocab,
    build_dictionaries,
    make_trees,
    parse_ptb,
    tree_nodes,
)

MAN = ("(ROOT (S (NP (NP (DT A) (NN man)) (PP (IN in) (NP (DT a) (JJ red) (NN shirt)))) "
       "(VP (VBZ rides) (NP (DT a) (NN bike)) (PP (IN down) (NP (DT the) (NN street)))) (. .)))")
MAN_LEMMAS = "a man in a red shirt ride a bike down the street .".split()
DOGS = ("(ROOT (S (NP (CD Two) (NNS dogs)) (VP (VBP play) (PP (IN with) (NP (DT a) (NN ball))) "
        "(PP (IN on) (NP (DT the) (NN grass)))) (. .)))")
DOGS_LEMMAS = "two dog play with a ball on the grass .".split()


def labels(ptb, lemmas=None):
    return [it.cands[0] if it else None for it in tree_nodes(ptb, lemmas)]


def test_man_in_red_shirt():
    nodes = tree_nodes(MAN, MAN_LEMMAS)
    assert [it.cands[0] if it else None for it in nodes] == \
        ["man", "in", "red shirt", "ride", "bike", "down", "street"]
    assert nodes[2].cands == ("red shirt", "shirt")  # adjective-noun pair backs off to the noun
    assert [it.words for it in nodes] == ["man", "in", "red shirt", "rides", "bike", "down", "street"]


def test_two_dogs_play():
    assert labels(DOGS, DOGS_LEMMAS) == ["dog", None, None, "play", "ball", "on", "grass"]
    # the same caption with the PP attached to the object NP (a common parser choice)
    other = ("(ROOT (S (NP (CD Two) (NNS dogs)) (VP (VBP play) (PP (IN with) (NP (NP (DT a) (NN ball)) "
             "(PP (IN on) (NP (DT the) (NN grass)))))) (. .)))")
    assert labels(other, DOGS_LEMMAS) == ["dog", None, None, "play", "ball", "on", "grass"]


def test_participial_np_caption_equals_clause():
    np_caption = ("(ROOT (NP (NP (NP (DT A) (NN man)) (PP (IN in) (NP (DT a) (JJ red) (NN shirt)))) "
                  "(VP (VBG riding) (NP (DT a) (NN bike)) (PP (IN down) (NP (DT the) (NN street)))) (. .)))")
    assert labels(np_caption, MAN_LEMMAS) == labels(MAN, MAN_LEMMAS)
    progressive = ("(ROOT (S (NP (DT A) (NN man)) (VP (VBZ is) (VP (VBG riding) (NP (DT a) (NN bike)))) (. .)))")
    assert labels(progressive, "a man be ride a bike .".split()) == \
        ["man", None, None, "ride", "bike", None, None]


def test_copula_existential_and_np_forms_agree():
    tail = ("(PP (TO to) (NP (NP (DT the) (NN left)) (PP (IN of) (NP (DT a) (JJ blue) (NN star)))))")
    forms = [
        f"(ROOT (S (NP (DT A) (JJ red) (NN circle)) (VP (VBZ is) {tail}) (. .)))",
        f"(ROOT (S (NP (EX There)) (VP (VBZ is) (NP (NP (DT a) (JJ red) (NN circle)) {tail})) (. .)))",
        f"(ROOT (NP (NP (DT A) (JJ red) (NN circle)) {tail} (. .)))",
        "(ROOT (NP (NP (DT A) (JJ red) (NN circle)) (ADVP (RB left) (PP (IN of) (NP (DT a) (JJ blue) (NN star)))) "
        "(. .)))",
    ]
    expected = ["red circle", "left", "blue star", None, None, None, None]
    for f in forms:
        assert labels(f) == expected, f


def test_whitening_rules():
    group = ("(ROOT (NP (NP (NP (DT A) (NN group)) (PP (IN of) (NP (NNS people)))) (VP (VBG standing) "
             "(PP (IN in) (NP (NP (NN front)) (PP (IN of) (NP (DT a) (JJ tall) (NN building)))))) (. .)))")
    assert labels(group, "a group of people stand in front of a tall building .".split()) == \
        ["people", None, None, "stand", None, "front", "tall building"]
    pair = "(ROOT (NP (NP (DT A) (NN tennis) (NN racket)) (CC and) (NP (DT a) (JJ yellow) (NN ball)) (. .)))"
    assert labels(pair) == ["tennis racket", "and", "yellow ball", None, None, None, None]
    corner = "(ROOT (NP (NP (DT A) (NN cat)) (PP (IN in) (NP (DT the) (JJ top) (JJ left) (NN corner))) (. .)))"
    nodes = tree_nodes(corner)
    assert nodes[1].cands == ("top left corner", "corner") and nodes[2] is None
    stop = "(ROOT (NP (NP (JJ Many) (JJ other) (NNS birds)) (. .)))"
    assert tree_nodes(stop, "many other bird .".split())[0].cands == ("bird",)


def test_parse_errors():
    with pytest.raises(ParseError, match="unbalanced"):
        parse_ptb("(ROOT (NP (DT a) (NN dog))")
    with pytest.raises(ParseError, match="lemmas"):
        parse_ptb("(ROOT (NP (DT a) (NN dog)))", ["a"])


def test_dictionaries_cutoffs_and_sizes():
    trees = [tree_nodes(MAN, MAN_LEMMAS)] * 3 + [tree_nodes(DOGS, DOGS_LEMMAS)]
    v = build_dictionaries(trees, entity_min_count=2, relation_min_count=1, max_entities=100, max_relations=3)
    assert "dog" not in v.entities and "man" in v.entities and "red shirt" in v.entities
    assert all(v.entity_counts[e] >= 2 for e in v.entities)
    assert len(v.relations) == 3 and v.relations[0] in ("ride", "in", "down")  # most frequent first
    assert v.label(0, trees[3][0]) == (-1, "")  # "dog" is out of the dictionary → null
    assert v.label(1, None) == (-1, "")
    rt = TreeVocab.from_json(json.loads(json.dumps(v.to_json())))
    assert rt.entities == v.entities and rt.relations == v.relations


def _ingest(tiny_shapes, tmp_path):
    from itmatch.data.ingest import IngestOptions, ingest

    ingest(tiny_shapes / "dataset_shapes.json", tiny_shapes / "images", tmp_path / "images.parquet",
           tmp_path / "captions.parquet", IngestOptions(verify_images="header"))
    return tmp_path / "captions.parquet"


def test_shapes_trees_name_the_mentioned_shapes(tiny_shapes, tmp_path):
    caps = _ingest(tiny_shapes, tmp_path)
    vocab = make_trees(caps, tmp_path / "trees.parquet", tmp_path / "tree_vocab.json", parser="gold",
                       json_path=tiny_shapes / "dataset_shapes.json", entity_min_count=1, relation_min_count=1)
    shape_nouns = {s for syn in CATEGORIES.values() for s in syn}
    data = json.loads((tiny_shapes / "dataset_shapes.json").read_text())
    gold = {s["sentid"]: s for img in data["images"] for s in img["sentences"]}
    t = pq.read_table(tmp_path / "trees.parquet").to_pandas()
    import pandas as pd

    split = pd.read_parquet(caps).set_index("caption_id")["split"]
    assert len(t) == len(split)
    for cid, lab, names, words in zip(t["caption_id"], t["labels"], t["names"], t["words"], strict=True):
        s = gold[cid]
        mentioned = [lem for lem in s["lemmas"] if lem in shape_nouns][:4]
        raw = tree_nodes(s["parse"], s["lemmas"])
        heads = [raw[k].head for k in ENTITY_NODES if raw[k] is not None and raw[k].head != "shape"]
        assert heads == mentioned, (s["raw"], heads)
        assert len(lab) == 7 and len(names) == 7 and len(words) == 7
        for k in range(7):
            pool = vocab.entities if k in ENTITY_NODES else vocab.relations
            assert (lab[k] == -1) == (names[k] == "")
            if lab[k] >= 0:
                assert pool[lab[k]] == names[k]
        if split[cid] == "train":  # every train entity is in the dictionary (min count 1)
            ent_names = [names[k].split()[-1] for k in ENTITY_NODES if names[k] and names[k] != "shape"]
            assert ent_names == mentioned
    assert np.stack(t["labels"]).shape == (len(t), 7)


def test_stanza_without_models_fails_clearly(tmp_path):
    import pandas as pd

    pd.DataFrame({"caption_id": [1], "image_id": [1], "split": ["train"], "text": ["A dog."]}).to_parquet(
        tmp_path / "c.parquet")
    with pytest.raises(StanzaModelsMissing) as err:
        make_trees(tmp_path / "c.parquet", tmp_path / "t.parquet", tmp_path / "v.json", parser="stanza",
                   stanza_dir=tmp_path / "stanza_resources")
    msg = str(err.value)
    assert "text.trees.stanza_dir" in msg and "snakemake --cores 1 fetch_stanza_models" in msg
    assert str(tmp_path / "stanza_resources") in msg
    assert not (tmp_path / "t.parquet").exists()
    (tmp_path / "half").mkdir()
    with pytest.raises(StanzaModelsMissing):
        check_stanza_models(tmp_path / "half")


def test_stanza_path_with_a_stand_in_pipeline(tmp_path, monkeypatch):
    """The batching/ordering code of stanza_parse, with a stand-in for stanza (no models here)."""
    import sys
    import types

    from itmatch.text.parsers import stanza_parse

    class Word:
        def __init__(self, text):
            self.text, self.lemma = text, None if text == "Dogs" else text.lower()

    class Tree:
        def __init__(self, words):
            self.words = words

        def __format__(self, spec):
            assert spec == "_O"
            return "(ROOT (NP " + " ".join(f"(NN {w})" for w in self.words) + "))"

    class Sentence:
        def __init__(self, words):
            self.words = [Word(w) for w in words]
            self.constituency = Tree(words)

    class Document:
        def __init__(self, sentences, text=None):
            self.text, self.sentences = text, []

    class Pipeline:
        calls: list[int] = []

        def __init__(self, lang, dir, processors, download_method, **kw):
            assert processors == "tokenize,pos,lemma,constituency" and download_method is None

        def bulk_process(self, docs):
            Pipeline.calls.append(len(docs))
            for d in docs:
                d.sentences = [Sentence(s.split()) for s in d.text.split(". ") if s]
            return docs

    monkeypatch.setitem(sys.modules, "stanza", types.SimpleNamespace(Pipeline=Pipeline, Document=Document))
    (tmp_path / "en").mkdir()
    (tmp_path / "resources.json").write_text("{}")
    texts = [f"Dogs run {i}. Second sentence" for i in range(5)] + [""]
    out = stanza_parse(texts, tmp_path, batch_size=2, device="cpu")
    assert Pipeline.calls == [2, 2, 2]
    assert out[3] == ("(ROOT (NP (NN Dogs) (NN run) (NN 3)))", ["dogs", "run", "3"])  # first sentence only
    assert out[5] == ("(ROOT (X))", [])
    assert tree_nodes(*out[0])[0].cands == ("dogs run", "run")  # lemma None → the word, lowercased
    assert tree_nodes(*out[5]) == [None] * 7


def test_random_parses_always_give_seven_well_typed_nodes():
    import random

    labels = ["S", "NP", "VP", "PP", "SBAR", "ADJP", "ADVP", "FRAG", "SINV", "WHNP", "NML", "QP", "PRN", "X"]
    tags = [("DT", "a"), ("NN", "dog"), ("NNS", "cats"), ("VBZ", "is"), ("VBG", "running"), ("IN", "on"),
            ("TO", "to"), ("JJ", "red"), ("CC", "and"), ("RB", "left"), (",", ","), (".", "."), ("EX", "there"),
            ("PRP", "it"), ("NN", "front"), ("IN", "of"), ("NN", "group"), ("CD", "3"), ("RP", "up"), ("MD", "can")]
    rng = random.Random(0)

    def gen(depth):
        if depth > 4 or rng.random() < 0.3:
            return "({} {})".format(*rng.choice(tags))
        return f"({rng.choice(labels)} " + " ".join(gen(depth + 1) for _ in range(rng.randint(1, 4))) + ")"

    for _ in range(3000):
        nodes = tree_nodes(f"(ROOT {gen(0)})")
        assert len(nodes) == 7
        for k, it in enumerate(nodes):
            assert it is None or it.kind == ("E" if k in ENTITY_NODES else "R")
