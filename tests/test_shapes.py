"""The embedded `shapes` generator: determinism, truthful captions, gold parses that yield the tokens."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from nltk import Tree
from nltk.tokenize import TreebankWordTokenizer

from itmatch.data.shapes import ShapesSpec, generate

# The test's own vocabulary (independent of the generator's tables).
NOUNS = {"circle": "circle", "disk": "circle", "square": "square", "triangle": "triangle", "star": "star",
         "diamond": "diamond", "rhombus": "diamond", "hexagon": "hexagon"}
PLURAL = {"circles": "circle", "disks": "circle", "squares": "square", "triangles": "triangle",
          "stars": "star", "diamonds": "diamond", "rhombuses": "diamond", "hexagons": "hexagon"}
COLOURS = {"red", "green", "blue", "yellow", "purple", "orange"}
SIZE_WORDS = {"small": "small", "little": "small", "large": "large", "big": "large"}
NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4}
REL_PATTERNS = [("to the left of", "left"), ("left of", "left"), ("to the right of", "right"),
                ("right of", "right"), ("above", "above"), ("over", "above"), ("below", "below"),
                ("under", "below"), ("beneath", "below")]


def centre(o):
    x1, y1, x2, y2 = o["box"]
    return (x1 + x2) / 2, (y1 + y2) / 2


def matches(o, words):
    """Does object ``o`` fit the noun phrase ``words`` (category, and colour/size where named)?"""
    cat = next((NOUNS[w] for w in words if w in NOUNS), None) or next(PLURAL[w] for w in words if w in PLURAL)
    colour, size = o["attributes"]
    return (o["category"] == cat and all(w == colour for w in words if w in COLOURS)
            and all(SIZE_WORDS[w] == size for w in words if w in SIZE_WORDS))


def holds(rel, a, b):
    (ax, ay), (bx, by) = centre(a), centre(b)
    dx, dy = bx - ax, by - ay
    return {"left": dx > 0 and abs(dx) >= abs(dy), "right": dx < 0 and abs(dx) >= abs(dy),
            "above": dy > 0 and abs(dy) > abs(dx), "below": dy < 0 and abs(dy) > abs(dx)}[rel]


def third(v, size):
    return min(2, int(3 * v / size))


def check_caption(text: str, objects: list[dict], size: int) -> str:
    """Assert the caption is true of the scene; return the kind of caption it is."""
    t = text.lower().rstrip(".")
    m = re.fullmatch(r"(\w+) shapes? on a textured background", t)
    if m:
        assert NUMBERS[m.group(1)] == len(objects), text
        return "count"
    for phrase, rel in REL_PATTERNS:
        if f" {phrase} " in f" {t} ":
            left, right = f" {t} ".split(f" {phrase} ", 1)
            lw = [w for w in left.split() if w not in {"there", "is"}]
            rw = right.split()
            assert any(holds(rel, a, b) for a in objects for b in objects
                       if a is not b and matches(a, lw) and matches(b, rw)), text
            return "relation"
    m = re.fullmatch(r"(.+?) (in the center|on the (left|right)|at the (top|bottom)|"
                     r"in the (top|bottom) (left|right) corner)", t)
    if m:
        words = m.group(1).split()
        pos = m.group(2)
        h = {"left": 0, "right": 2}.get(m.group(3) or m.group(6), 1)
        v = {"top": 0, "bottom": 2}.get(m.group(4) or m.group(5), 1)
        assert any(matches(o, words) and third(centre(o)[0], size) == h and third(centre(o)[1], size) == v
                   for o in objects), (text, pos)
        return "position"
    parts = [p.split() for p in re.split(r",| and ", t)]
    described = 0
    for words in parts:
        n = NUMBERS.get(words[0], 1)
        group = [o for o in objects if matches(o, words)]
        assert len(group) == n, text
        described += n
    assert described == len(objects), text
    return "list"


@pytest.fixture(scope="module")
def dataset(tiny_shapes: Path) -> dict:
    return json.loads((tiny_shapes / "dataset_shapes.json").read_text())


def test_same_seed_gives_identical_outputs(tmp_path, tiny_shapes):
    spec = ShapesSpec(seed=3, n_train=40, n_val=10, n_test=10, image_size=96)
    generate(spec, tmp_path / "again.json", tmp_path / "images", processes=2)
    assert (tmp_path / "again.json").read_bytes() == (tiny_shapes / "dataset_shapes.json").read_bytes()
    files = sorted(p.relative_to(tiny_shapes / "images") for p in (tiny_shapes / "images").rglob("*.jpg"))
    assert len(files) == 60
    for f in files:
        assert (tmp_path / "images" / f).read_bytes() == (tiny_shapes / "images" / f).read_bytes(), f
    generate(ShapesSpec(seed=4, n_train=40, n_val=10, n_test=10, image_size=96), tmp_path / "other.json",
             tmp_path / "other")
    assert (tmp_path / "other.json").read_bytes() != (tmp_path / "again.json").read_bytes()


def test_structure(dataset):
    images = dataset["images"]
    assert [i["split"] for i in images] == ["train"] * 40 + ["val"] * 10 + ["test"] * 10
    sentids = [s["sentid"] for i in images for s in i["sentences"]]
    assert sentids == list(range(300))
    for img in images:
        assert len(img["sentences"]) == 5
        assert 1 <= len(img["objects"]) <= 4
        for o in img["objects"]:
            x1, y1, x2, y2 = o["box"]
            assert 0 <= x1 < x2 <= 96 and 0 <= y1 < y2 <= 96


def test_vocabulary_sizes():
    from itmatch.data.shapes import CATEGORIES, COLOURS, SIZES

    assert len(CATEGORIES) >= 6 and len(COLOURS) >= 6 and len(SIZES) == 2


def test_captions_are_true_of_the_image(dataset):
    kinds = set()
    for img in dataset["images"]:
        for s in img["sentences"]:
            kinds.add(check_caption(s["raw"], img["objects"], img["width"]))
    assert kinds == {"count", "relation", "position", "list"}


def test_checker_rejects_false_captions(dataset):
    """The truth checker above can fail: swapped relations and wrong counts are caught."""
    img = next(i for i in dataset["images"] if any(" left of " in s["raw"] for s in i["sentences"]))
    cap = next(s["raw"] for s in img["sentences"] if " left of " in s["raw"])
    with pytest.raises(AssertionError):
        check_caption(cap.replace(" left of ", " right of "), img["objects"], img["width"])
    with pytest.raises(AssertionError):
        wrong = {1: "Two", 2: "Three", 3: "Four", 4: "One"}[len(img["objects"])]
        check_caption(f"{wrong} shapes on a textured background.", img["objects"], img["width"])


def test_gold_parse_yields_tokens_and_lemmas(dataset):
    tok = TreebankWordTokenizer()
    for img in dataset["images"]:
        for s in img["sentences"]:
            tree = Tree.fromstring(s["parse"])
            assert tree.label() == "ROOT"
            assert tree.leaves() == tok.tokenize(s["raw"].lower())
            assert [w for w in tree.leaves() if w not in {".", ","}] == s["tokens"]
            assert len(s["lemmas"]) == len(tree.leaves())
            for (word, tag), lemma in zip(tree.pos(), s["lemmas"], strict=True):
                if word in {"shape", "shapes"}:
                    assert lemma == "shape"
                elif tag == "NNS":
                    assert PLURAL[word] == NOUNS[lemma]
                elif tag == "VBZ":
                    assert lemma == "be"
                elif word == "an":
                    assert lemma == "a"
                else:
                    assert lemma == word
