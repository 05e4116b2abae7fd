"""The embedded synthetic dataset ``shapes``.

Scenes of 1–4 coloured shapes of two sizes on a textured background, five captions per image from
a small grammar (synonyms, colour and size attributes, counts, absolute positions and pairwise
spatial relations), with, per object, a tight box, a category and its attributes, and per caption
its gold Penn-Treebank constituency parse and one lemma per parse leaf. Everything is a pure
function of ``(seed, image index)``: the same seed gives byte-identical JSON and identical images.

Relations are only stated when they are unambiguous: the centres differ by more than
``RELATION_MARGIN`` of the image side along the dominant axis (``left of``/``right of`` when
|dx| ≥ |dy|, ``above``/``below`` otherwise; y grows downwards). Positions use image thirds.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from itmatch.utils.io import atomic_path
from itmatch.utils.logs import log, progress

CATEGORIES: dict[str, list[str]] = {
    "circle": ["circle", "disk"],
    "square": ["square"],
    "triangle": ["triangle"],
    "star": ["star"],
    "diamond": ["diamond", "rhombus"],
    "hexagon": ["hexagon"],
}
PLURALS = {"rhombus": "rhombuses"}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (35, 75, 215),
    "yellow": (240, 215, 30),
    "purple": (135, 50, 175),
    "orange": (245, 135, 20),
}
SIZES: dict[str, list[str]] = {"small": ["small", "little"], "large": ["large", "big"]}
SIZE_RANGE = {"small": (0.14, 0.20), "large": (0.30, 0.40)}  # side as a fraction of the image side
RELATIONS: dict[str, list[list[str]]] = {  # relation -> phrasings (token lists)
    "left_of": [["to", "the", "left", "of"], ["left", "of"]],
    "right_of": [["to", "the", "right", "of"], ["right", "of"]],
    "above": [["above"], ["over"]],
    "below": [["below"], ["under"], ["beneath"]],
}
RELATION_MARGIN = 0.12
COUNT_WORDS = ["zero", "one", "two", "three", "four", "five"]
ATTRIBUTES = list(COLOURS) + list(SIZES)  # detector attribute classes


@dataclass
class ShapesSpec:
    """Generator settings (the ``datasets.shapes.generator`` config section)."""

    seed: int = 0
    n_train: int = 3000
    n_val: int = 500
    n_test: int = 500
    image_size: int = 160
    min_objects: int = 1
    max_objects: int = 4
    jpeg_quality: int = 90
    captions_per_image: int = 5

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ShapesSpec:
        return cls(**cfg)


@dataclass
class Obj:
    category: str
    colour: str
    size: str
    box: list[int]  # x1, y1, x2, y2 (tight, pixels)
    points: list[tuple[float, float]] = field(default_factory=list, repr=False)

    @property
    def centre(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


# ----------------------------------------------------------------------------------------------
# scene
# ----------------------------------------------------------------------------------------------

def _shape_points(category: str, x0: float, y0: float, s: float) -> list[tuple[float, float]]:
    cx, cy, r = x0 + s / 2, y0 + s / 2, s / 2
    if category == "circle":
        return [(cx + r * math.cos(t), cy + r * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 48, False)]
    if category == "square":
        return [(x0, y0), (x0 + s, y0), (x0 + s, y0 + s), (x0, y0 + s)]
    if category == "triangle":
        return [(cx, y0), (x0 + s, y0 + s), (x0, y0 + s)]
    if category == "diamond":
        return [(cx, y0), (x0 + s, cy), (cx, y0 + s), (x0, cy)]
    if category == "hexagon":
        return [(cx + r * math.cos(t), cy + r * math.sin(t)) for t in np.arange(6) * math.pi / 3]
    if category == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            t = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(t), cy + rad * math.sin(t)))
        return pts
    raise ValueError(f"unknown shape category {category!r}")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Textured grey background: smooth low-frequency noise plus fine grain, slightly tinted."""
    coarse = rng.uniform(-1, 1, (6, 6, 1)).astype(np.float32)
    smooth = np.asarray(Image.fromarray(((coarse[..., 0] + 1) * 127.5).astype(np.uint8)).resize(
        (size, size), Image.BILINEAR), dtype=np.float32)[..., None] / 127.5 - 1
    base = rng.uniform(100, 160)
    tint = rng.uniform(-8, 8, 3).astype(np.float32)
    grain = rng.normal(0, 6, (size, size, 1)).astype(np.float32)
    img = base + 28 * smooth + grain + tint
    return np.clip(img, 0, 255).astype(np.uint8)


def _place_objects(rng: np.random.Generator, spec: ShapesSpec) -> list[Obj]:
    S = spec.image_size
    n = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    objects: list[Obj] = []
    for _ in range(n):
        for _attempt in range(60):
            category = str(rng.choice(list(CATEGORIES)))
            colour = str(rng.choice(list(COLOURS)))
            size = str(rng.choice(list(SIZES)))
            lo, hi = SIZE_RANGE[size]
            s = float(rng.uniform(lo, hi)) * S
            x0, y0 = float(rng.uniform(2, S - s - 2)), float(rng.uniform(2, S - s - 2))
            pts = _shape_points(category, x0, y0, s)
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            box = [int(math.floor(min(xs))), int(math.floor(min(ys))),
                   int(math.ceil(max(xs))), int(math.ceil(max(ys)))]
            if all(_disjoint(box, o.box, pad=3) for o in objects):
                objects.append(Obj(category, colour, size, box, pts))
                break
    return objects


def _disjoint(a: list[int], b: list[int], pad: int) -> bool:
    return a[2] + pad <= b[0] or b[2] + pad <= a[0] or a[3] + pad <= b[1] or b[3] + pad <= a[1]


def render(objects: list[Obj], background: np.ndarray) -> Image.Image:
    img = Image.fromarray(background, "RGB")
    draw = ImageDraw.Draw(img)
    for o in objects:
        draw.polygon(o.points, fill=COLOURS[o.colour], outline=tuple(int(c * 0.6) for c in COLOURS[o.colour]))
    return img


# ----------------------------------------------------------------------------------------------
# geometry → language
# ----------------------------------------------------------------------------------------------

def relation(a: Obj, b: Obj, image_size: int) -> str | None:
    """Spatial relation of ``a`` with respect to ``b``, or None when it is not clear-cut."""
    (ax, ay), (bx, by) = a.centre, b.centre
    dx, dy = bx - ax, by - ay
    if max(abs(dx), abs(dy)) < RELATION_MARGIN * image_size:
        return None
    if abs(dx) >= abs(dy):
        return "left_of" if dx > 0 else "right_of"
    return "above" if dy > 0 else "below"


def position(o: Obj, image_size: int) -> tuple[str, str]:
    """(vertical, horizontal) third of the object's centre: top/middle/bottom, left/center/right."""
    cx, cy = o.centre
    h = ("left", "center", "right")[min(2, int(3 * cx / image_size))]
    v = ("top", "middle", "bottom")[min(2, int(3 * cy / image_size))]
    return v, h


# A constituent is (label, children) or a leaf (tag, word, lemma).
Leaf = tuple[str, str, str]
Node = tuple[str, list]


def _leaf(tag: str, word: str, lemma: str | None = None) -> Leaf:
    return (tag, word, lemma if lemma is not None else word)


def _article(next_word: str) -> Leaf:
    return _leaf("DT", "an" if next_word[0] in "aeiou" else "a", "a")


def _noun_phrase(rng: np.random.Generator, o: Obj, p_size: float = 0.6, p_colour: float = 0.85) -> Node:
    """NP for one object with a random (true) subset of its attributes: "a small red circle"."""
    words: list[Leaf] = []
    if rng.random() < p_size:
        words.append(_leaf("JJ", str(rng.choice(SIZES[o.size]))))
    if rng.random() < p_colour:
        words.append(_leaf("JJ", o.colour))
    noun = str(rng.choice(CATEGORIES[o.category]))
    words.append(_leaf("NN", noun))
    return ("NP", [_article(words[0][1]), *words])


def _plural(noun: str) -> str:
    return PLURALS.get(noun, noun + "s")


def _group_phrase(rng: np.random.Generator, group: list[Obj]) -> Node:
    """NP for all objects sharing colour and category: "two red circles" / "a blue star"."""
    o = group[0]
    noun = str(rng.choice(CATEGORIES[o.category]))
    if len(group) == 1:
        return _noun_phrase(rng, o, p_size=0.5, p_colour=1.0)
    words: list[Leaf] = [_leaf("CD", COUNT_WORDS[len(group)])]
    if len({g.size for g in group}) == 1 and rng.random() < 0.4:
        words.append(_leaf("JJ", str(rng.choice(SIZES[o.size]))))
    words += [_leaf("JJ", o.colour), _leaf("NNS", _plural(noun), noun)]
    return ("NP", words)


def _relation_pp(rng: np.random.Generator, rel: str, obj_np: Node) -> Node:
    phr = RELATIONS[rel][int(rng.integers(len(RELATIONS[rel])))]
    if phr[0] == "to":  # to the left of X
        return ("PP", [_leaf("TO", "to"), ("NP", [("NP", [_leaf("DT", "the"), _leaf("NN", phr[2])]),
                                                   ("PP", [_leaf("IN", "of"), obj_np])])])
    if len(phr) == 2:  # left of X
        return ("ADVP", [_leaf("RB", phr[0]), ("PP", [_leaf("IN", "of"), obj_np])])
    return ("PP", [_leaf("IN", phr[0]), obj_np])


def _position_pp(v: str, h: str) -> Node:
    if v == "middle" and h == "center":
        return ("PP", [_leaf("IN", "in"), ("NP", [_leaf("DT", "the"), _leaf("NN", "center")])])
    if v == "middle":
        return ("PP", [_leaf("IN", "on"), ("NP", [_leaf("DT", "the"), _leaf("NN", h)])])
    if h == "center":
        return ("PP", [_leaf("IN", "at"), ("NP", [_leaf("DT", "the"), _leaf("NN", v)])])
    return ("PP", [_leaf("IN", "in"), ("NP", [_leaf("DT", "the"), _leaf("JJ", v), _leaf("JJ", h),
                                              _leaf("NN", "corner")])])


def _list_np(parts: list[Node]) -> Node:
    children: list = []
    for i, p in enumerate(parts):
        if i and i == len(parts) - 1:
            children.append(_leaf("CC", "and"))
        elif i:
            children.append(_leaf(",", ","))
        children.append(p)
    return ("NP", children) if len(parts) > 1 else parts[0]


def _period() -> Leaf:
    return _leaf(".", ".")


def caption_candidates(rng: np.random.Generator, objects: list[Obj], S: int) -> list[Node]:
    """All caption trees true of the scene (one per template instance), in a fixed order."""
    out: list[Node] = []
    pairs = [(a, b, relation(a, b, S)) for a in objects for b in objects if a is not b]
    pairs = [(a, b, r) for a, b, r in pairs if r is not None]
    for a, b, rel in pairs:
        form = int(rng.integers(3))
        if form == 0:  # a small red circle is to the left of a blue star .
            out.append(("S", [_noun_phrase(rng, a), ("VP", [_leaf("VBZ", "is", "be"),
                                                           _relation_pp(rng, rel, _noun_phrase(rng, b))]),
                              _period()]))
        elif form == 1:  # there is a red circle above a blue star .
            np_ = ("NP", [_noun_phrase(rng, a), _relation_pp(rng, rel, _noun_phrase(rng, b))])
            out.append(("S", [("NP", [_leaf("EX", "there")]), ("VP", [_leaf("VBZ", "is", "be"), np_]),
                              _period()]))
        else:  # a red circle below a blue star .
            out.append(("NP", [_noun_phrase(rng, a), _relation_pp(rng, rel, _noun_phrase(rng, b)), _period()]))
    for o in objects:  # a large green hexagon in the top left corner .
        v, h = position(o, S)
        out.append(("NP", [_noun_phrase(rng, o), _position_pp(v, h), _period()]))
    groups: dict[tuple[str, str], list[Obj]] = {}
    for o in objects:
        groups.setdefault((o.colour, o.category), []).append(o)
    out.append(("NP", [_list_np([_group_phrase(rng, g) for g in groups.values()]), _period()]))
    n = len(objects)  # three shapes on a textured background .
    out.append(("NP", [("NP", [_leaf("CD", COUNT_WORDS[n]), _leaf("NNS" if n > 1 else "NN",
                                                                 "shapes" if n > 1 else "shape", "shape")]),
                       ("PP", [_leaf("IN", "on"), ("NP", [_leaf("DT", "a"), _leaf("JJ", "textured"),
                                                          _leaf("NN", "background")])]), _period()]))
    return out


def choose_captions(rng: np.random.Generator, candidates: list[Node], k: int) -> list[Node]:
    """k captions, distinct templates first; relations are preferred because they carry position."""
    order = list(rng.permutation(len(candidates)))
    picked = [candidates[i] for i in order[:k]]
    while len(picked) < k:  # few objects: reuse templates (a fresh draw of words was made for each)
        picked.append(candidates[int(rng.integers(len(candidates)))])
    return picked


def leaves(tree: Node | Leaf) -> list[Leaf]:
    if len(tree) == 3 and isinstance(tree[1], str):
        return [tree]  # type: ignore[list-item]
    return [leaf for child in tree[1] for leaf in leaves(child)]


def to_ptb(tree: Node | Leaf) -> str:
    if len(tree) == 3 and isinstance(tree[1], str):
        return f"({tree[0]} {tree[1]})"
    return f"({tree[0]} " + " ".join(to_ptb(c) for c in tree[1]) + ")"


def sentence_record(tree: Node) -> dict[str, Any]:
    words = [leaf[1] for leaf in leaves(tree)]
    raw = " ".join(words[:-1]) + words[-1]  # final period attached
    raw = raw.replace(" ,", ",")
    return {
        "tokens": [w for w in words if w not in {".", ","}],
        "raw": raw[0].upper() + raw[1:],
        "parse": "(ROOT " + to_ptb(tree) + ")",
        "lemmas": [leaf[2] for leaf in leaves(tree)],
    }


# ----------------------------------------------------------------------------------------------
# dataset
# ----------------------------------------------------------------------------------------------

def make_image(spec: ShapesSpec, index: int) -> tuple[Image.Image, list[Obj], list[dict[str, Any]]]:
    """Scene, objects and caption records of image ``index`` (a pure function of seed and index)."""
    rng = np.random.default_rng([spec.seed, index])
    objects = _place_objects(rng, spec)
    img = render(objects, _background(rng, spec.image_size))
    cands = caption_candidates(rng, objects, spec.image_size)
    sentences = [sentence_record(t) for t in choose_captions(rng, cands, spec.captions_per_image)]
    return img, objects, sentences


def _splits(spec: ShapesSpec) -> list[str]:
    return ["train"] * spec.n_train + ["val"] * spec.n_val + ["test"] * spec.n_test


def _work(args: tuple[ShapesSpec, int, str, str]) -> dict[str, Any]:
    spec, index, split, folder = args
    img, objects, sentences = make_image(spec, index)
    filename = f"shapes_{split}_{index:06d}.jpg"
    img.save(Path(folder) / split / filename, quality=spec.jpeg_quality)
    return {
        "filepath": split,
        "filename": filename,
        "imgid": index,
        "cocoid": index,
        "split": split,
        "width": spec.image_size,
        "height": spec.image_size,
        "objects": [{"box": o.box, "category": o.category, "attributes": [o.colour, o.size]}
                    for o in objects],
        "sentences": sentences,
    }


def generate(spec: ShapesSpec, json_path: str | Path, image_dir: str | Path, processes: int = 1) -> None:
    """Write all images (JPEG) under ``image_dir/{split}/`` and the Karpathy-format JSON, atomically."""
    splits = _splits(spec)
    image_dir = Path(image_dir)
    with atomic_path(image_dir) as tmp_dir:
        for split in ("train", "val", "test"):
            (tmp_dir / split).mkdir(parents=True, exist_ok=True)
        jobs = [(spec, i, s, str(tmp_dir)) for i, s in enumerate(splits)]
        if processes > 1:
            with mp.get_context("fork").Pool(processes) as pool:
                records = list(progress(pool.imap(_work, jobs, chunksize=32), "shapes images", len(jobs)))
        else:
            records = [_work(j) for j in progress(jobs, "shapes images", len(jobs))]
    sentid = 0
    for rec in records:
        rec["sentids"] = []
        for s in rec["sentences"]:
            s["imgid"], s["sentid"] = rec["imgid"], sentid
            rec["sentids"].append(sentid)
            sentid += 1
    payload = {"dataset": "shapes", "categories": list(CATEGORIES), "attributes": ATTRIBUTES,
               "images": records}
    with atomic_path(json_path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, separators=(",", ":"))
    log.info("shapes: %d images (%d/%d/%d), %d captions", len(records), spec.n_train, spec.n_val,
             spec.n_test, sentid)
