"""``itmatch retrieve``: ask a trained model which images match a sentence, or which captions match an image.

A run is a results folder ``<workdir>/results/<model>/<dataset>[/<variant>]`` holding ``model.pt``; everything
else is found where the workflow puts it (docs/contract.md): ``results/data/<dataset>/`` (images, captions),
``results/text/<dataset>/`` (vocabulary, tokens and the optional trees / BERT features) and
``results/features/<dataset>/`` (regions, blocks, tags). The model and its caption tokenisation
(``tokens``: ``<start>``/``<end>``, ``max_words``) come from the checkpoint, so a run is queried exactly as it
was evaluated: a query that is one of the dataset's captions (or images) gets the scores of ``sims.h5``.

Queries:

- text: tokenised as the training captions (:func:`itmatch.text.tokenize.tokenize` + ``vocab.json``; words
  outside the vocabulary are ``<unk>`` and reported); scored against every image of the split;
- image id (of any split): its stored regions; an image file: its regions extracted on the fly with the
  dataset's detector (``detector.checkpoints.<dataset>`` with the dataset's ``detector`` settings, the same
  weights as ``regions.h5``, which is checked), its block index computed as the ``blocks`` rule does. Scored
  against every caption of the split.

Inputs some models need for a new query are made the way the workflow makes them: BERT word vectors (GLFN)
with ``text.bert`` of the dataset, referral trees (SMFEA) with the dataset's parser when it is ``stanza``,
tag vectors of new region phrases (GLFN) with BERT. Where that is impossible (a ``gold`` parser has no parse
of a new sentence; BERT or stanza models absent) the query is refused with a message naming the missing
input. The configuration (only read when a query needs it: a new image file or such inputs) is the one the
workflow resolves: ``config/config.yaml`` of the working directory plus ``--configfile`` overrides.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from itmatch.config import schema_defaults
from itmatch.corpus.data import (
    IMAGE_META,
    Corpus,
    DataPaths,
    RowDataset,
    TextOptions,
    collate_captions,
    collate_images,
    loader,
)
from itmatch.evaluation.evaluate import fuse_block, fusion_weights, score_batches
from itmatch.models.checkpoint import checkpoint_models, read_checkpoint
from itmatch.models.registry import MODELS, model_inputs
from itmatch.text.tokenize import tokenize
from itmatch.text.vocab import UNK_ID, Vocab
from itmatch.utils.device import resolve_device, resolve_precision

#: artifact → (folder under results/, file name); the workflow's layout (docs/contract.md)
LAYOUT = {"images": ("data", "images.parquet"), "captions": ("data", "captions.parquet"),
          "tokens": ("text", "tokens.parquet"), "vocab": ("text", "vocab.json"),
          "regions": ("features", "regions.h5"), "blocks": ("features", "blocks.h5"),
          "tags": ("features", "tags.h5"), "bert": ("text", "bert.h5"), "trees": ("text", "trees.parquet"),
          "concepts": ("text", "concepts.h5"), "grid": ("features", "grid.h5")}


class RetrieveError(ValueError):
    """A query that cannot be answered: the message names the run, the input or the setting at fault."""


@dataclass
class Run:
    """A results folder of a trained model: where it is, and the workflow directory around it."""

    folder: Path
    workdir: Path
    model: str
    dataset: str
    checkpoint: Path
    contents: dict[str, Any] = field(repr=False, default_factory=dict)  # model.pt as read

    def artifact(self, name: str) -> Path:
        sub, fname = LAYOUT[name]
        return self.workdir / "results" / sub / self.dataset / fname


def locate_run(run: str | Path) -> Run:
    """The :class:`Run` of a results folder ``<workdir>/results/<model>/<dataset>[/<variant>]``."""
    folder = Path(run)
    if not folder.is_dir():
        raise RetrieveError(f"RUN {run}: no such folder (a results folder such as results/pfan/shapes)")
    checkpoint = folder / "model.pt"
    if not checkpoint.is_file():
        raise RetrieveError(f"RUN {run}: no model.pt in it (train it first, e.g. snakemake --cores 2 "
                            f"{Path(run) / 'metrics.json'})")
    try:
        ck = read_checkpoint(checkpoint)
    except (ValueError, OSError, RuntimeError) as e:
        raise RetrieveError(f"RUN {run}: {e}") from None
    model = str(ck["model"])
    parts = folder.resolve().parts
    for i in range(len(parts) - 3, -1, -1):
        if parts[i] == "results" and parts[i + 1] == model:
            return Run(folder, Path(*parts[:i]), model, parts[i + 2], checkpoint, ck)
    raise RetrieveError(f"RUN {run}: not a folder results/{model}/<dataset>[/<variant>] of a workflow directory "
                        f"(its model.pt is a {model} checkpoint; models: {', '.join(MODELS)})")


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise RetrieveError(f"{path} ({what}) is missing: build it with `snakemake --cores 2 {path}` in the "
                            "workflow directory")
    return path


@dataclass
class Hit:
    """One retrieved image or caption."""

    rank: int
    score: float
    image_id: int
    caption_id: int | None = None
    text: str = ""
    file: str = ""
    match: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"rank": self.rank, "score": self.score, "image_id": self.image_id}
        if self.caption_id is not None:
            d["caption_id"] = self.caption_id
        if self.file:
            d["file"] = self.file
        d["text"] = self.text
        if self.match is not None:
            d["match"] = self.match
        return d


@dataclass
class Result:
    """The answer to one query: its description (what was asked, how it was read) and the hits."""

    query: dict[str, Any]
    hits: list[Hit]
    info: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {**self.info, "query": self.query, "k": len(self.hits), "results": [h.as_dict() for h in self.hits]}


class Retriever:
    """A loaded run: the model (all its parts), the dataset's corpus and, on demand, its configuration, detector,
    BERT and parser. :meth:`text` and :meth:`image` answer queries."""

    def __init__(self, run: str | Path, split: str = "test", device: str = "auto", precision: str = "fp32",
                 config_path: str | Path | None = None, configfiles: list[str | Path] | None = None,
                 image_batch: int | None = None, caption_batch: int | None = None):
        self.run = locate_run(run)
        self._config_path, self._configfiles = config_path, list(configfiles or [])
        self._config: dict[str, Any] | None = None
        self.device = resolve_device(device, "--device")
        self.precision = resolve_precision(precision, self.device, "--precision")
        e = schema_defaults("evaluation")
        self.image_chunk = int(image_batch or e["image_batch"])
        self.caption_chunk = int(caption_batch or e["caption_batch"])
        ck = self.run.contents
        cfgs = [p["config"] for p in ck["parts"]]
        self.requires = frozenset().union(*(model_inputs(self.run.model, c) for c in cfgs))
        text = {TextOptions.from_config(c) for c in cfgs}
        if len(text) != 1:
            raise RetrieveError(f"{self.run.checkpoint}: the parts tokenise captions differently ({text})")
        self.text_options = text.pop()
        paths = {name: str(_need(self.run.artifact(name), name)) for name in ("images", "captions", "tokens",
                                                                                "vocab", "regions")}
        for name in ("blocks", "tags", "bert", "trees", "concepts", "grid"):
            if name in self.requires:
                paths[name] = str(_need(self.run.artifact(name), f"{self.run.model} reads {name}"))
        self.corpus = Corpus(DataPaths(**paths), self.requires, self.text_options)
        splits = sorted(set(self.corpus.image_split))
        if split not in splits:
            raise RetrieveError(f"--split {split!r}: dataset {self.run.dataset} has the splits {', '.join(splits)}")
        self.split = split
        _, self.models = checkpoint_models(ck, self.device)
        self.weights = fusion_weights(self.models)
        self.vocab = Vocab.load(paths["vocab"])
        images = pq.read_table(paths["images"], columns=["image_id", "file"]).to_pandas()
        self.image_file = images["file"].astype(str).to_numpy()
        self.image_row = {int(i): r for r, i in enumerate(images["image_id"])}
        caps = pq.read_table(paths["captions"], columns=["caption_id", "text"]).to_pandas()
        self.caption_text = caps["text"].astype(str).to_numpy()
        self._first_caption: dict[int, int] = {}
        for row, img in enumerate(self.corpus.caption_image):
            self._first_caption.setdefault(int(img), row)
        self._detector: tuple[Any, dict[str, Any], dict[str, Any]] | None = None
        self._bert: tuple[Any, Any] | None = None

    # ---- configuration and tools, on demand ----
    @property
    def config(self) -> dict[str, Any]:
        """The workflow's configuration (``config/config.yaml`` of the working directory + ``--configfile``s)."""
        if self._config is None:
            from itmatch.recipes import load_recipe_config  # snakemake's validator: only when needed

            path = Path(self._config_path) if self._config_path else self.run.workdir / "config" / "config.yaml"
            if not path.is_file():
                raise RetrieveError(f"this query needs the workflow's configuration, and {path} does not exist: "
                                    "give it with --config (and --configfile for the overrides the run used)")
            self._config = load_recipe_config(path, self._configfiles)
            if self.run.dataset not in (self._config.get("datasets") or {}):
                raise RetrieveError(f"{path}: dataset {self.run.dataset!r} is not configured under 'datasets'")
        return self._config

    def _path(self, value: str) -> str:
        """A path of the configuration (relative to the workflow directory), or a ``package:`` model spec."""
        if value.startswith("package:") or Path(value).is_absolute():
            return value
        return str(self.run.workdir / value)

    def detector(self) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """(model, meta, settings) of the dataset's detector, checked against the weights of ``regions.h5``."""
        if self._detector is None:
            from itmatch.features.detector import checkpoint_path, detector_config, load_detector
            from itmatch.features.regions_io import open_regions

            section = self.config["detector"]
            cfg = detector_config(section, self.run.dataset)
            try:
                path = self._path(checkpoint_path(section, self.run.dataset, must_exist=False))
            except FileNotFoundError as e:
                raise RetrieveError(f"a new image needs the dataset's detector: {e}") from None
            if not Path(path).is_file():
                raise RetrieveError(f"a new image needs the dataset's detector: config key detector.checkpoints."
                                    f"{self.run.dataset}: file {path} does not exist")
            model, meta = load_detector(path, cfg, device=str(self.device))
            with open_regions(self.corpus.paths.regions) as reg:
                stored = reg.meta
            if stored.weights_sha256 != meta["weights_sha256"]:
                raise RetrieveError(f"detector {path} (sha256 {meta['weights_sha256'][:12]}…) is not the one that "
                                    f"extracted {self.corpus.paths.regions} ({stored.detector}, sha256 "
                                    f"{stored.weights_sha256[:12]}…): its regions would not be comparable")
            meta["object_names"], meta["attribute_names"] = stored.object_names, stored.attribute_names
            self._detector = (model, meta, cfg)
        return self._detector

    def bert(self) -> tuple[Any, Any]:
        if self._bert is None:
            from itmatch.text.bert import BertModelMissing, load_bert

            b = self.config["text"]["bert"]
            spec = self._path((b.get("dataset_model") or {}).get(self.run.dataset, b["model"]))
            try:
                self._bert = load_bert(spec, str(self.device))
            except BertModelMissing as e:
                raise RetrieveError(f"{self.run.model} reads BERT vectors of a new query, and the model is "
                                    f"missing: {e}") from None
        return self._bert

    # ---- queries ----
    def _caption_rows_with_tokens(self, ids: np.ndarray) -> np.ndarray:
        c = self.corpus
        lengths = np.diff(c.token_offsets)
        rows = np.flatnonzero(lengths == len(ids))
        return np.array([r for r in rows if np.array_equal(c.tokens[c.token_offsets[r]:c.token_offsets[r + 1]],
                                                           ids)], dtype=np.int64)

    def caption_batch(self, text: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The caption batch of one query sentence and how it was read (tokens, unknown words)."""
        words = tokenize(text)
        if not words:
            raise RetrieveError("--text has no words")
        ids = np.asarray(self.vocab.encode(words), dtype=np.int64)
        unknown = [w for w, i in zip(words, ids, strict=True) if i == UNK_ID]
        same = self._caption_rows_with_tokens(ids)
        item: dict[str, Any] = {"tokens": self.text_options.apply(ids), "index": -1, "image_index": -1}
        max_words = self.text_options.max_words
        if self.corpus.bert is not None:
            if len(same):
                item["bert"] = self.corpus.caption_item(int(same[0]))["bert"]
            else:
                from itmatch.text.bert import word_features

                tok, net = self.bert()
                vec = word_features([words], tok, net, int(self.config["text"]["bert"]["max_length"]))[0]
                vec = vec.astype(np.float16).astype(np.float32)  # as bert.h5 stores them
                item["bert"] = vec if max_words is None else vec[:max_words]
        if self.corpus.trees is not None:
            item["tree_labels"] = self._tree_labels(text, same)
        info = {"text": text, "tokens": words, "unknown_words": unknown}
        if len(same):
            info["dataset_caption_ids"] = [int(self.corpus.caption_ids[r]) for r in same]
        return collate_captions([item]), info

    def _tree_labels(self, text: str, same: np.ndarray) -> np.ndarray:
        if len(same):
            return self.corpus.trees[int(same[0])]
        trees = self.config["text"]["trees"]
        parser = (trees.get("parser") or {}).get(self.run.dataset, "stanza")
        if parser != "stanza":
            raise RetrieveError(f"{self.run.model} reads the referral tree of a caption, and dataset "
                                f"{self.run.dataset} takes them from gold parses (config key text.trees.parser."
                                f"{self.run.dataset}: {parser}), which a new sentence does not have: query one of "
                                f"the dataset's captions, or parse with stanza (text.trees.parser."
                                f"{self.run.dataset}: stanza)")
        from itmatch.text.parsers import StanzaModelsMissing, stanza_parse
        from itmatch.text.trees import NULL, TreeVocab, tree_nodes

        try:
            ptb, lemmas = stanza_parse([text], self._path(trees["stanza_dir"]), 1, str(self.device))[0]
        except StanzaModelsMissing as e:
            raise RetrieveError(f"{self.run.model} reads the referral tree of a caption: {e}") from None
        vocab_path = Path(self.corpus.paths.trees).with_name("tree_vocab.json")
        vocab = TreeVocab.from_json(json.loads(vocab_path.read_text(encoding="utf-8")))
        labels = np.full(7, NULL, dtype=np.int64)
        for pos, node in enumerate(tree_nodes(ptb, lemmas)):
            labels[pos] = vocab.label(pos, node)[0]
        return labels

    def image_item(self, query: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """The image item of an image id of the dataset or of an image file, and how it was read."""
        path = Path(query)
        if path.is_file():
            return self._file_item(path), {"file": str(path)}
        try:
            image_id = int(query)
        except ValueError:
            image_id = None
        if image_id is None or image_id not in self.image_row:
            some = ", ".join(str(int(i)) for i in self.corpus.image_ids[:3])
            raise RetrieveError(f"--image {query!r}: neither an image file nor an image id of dataset "
                                f"{self.run.dataset} (ids such as {some})")
        row = self.image_row[image_id]
        return self.corpus.image_item(row), {"image_id": image_id, "file": self.image_file[row],
                                             "split": str(self.corpus.image_split[row])}

    def _file_item(self, path: Path) -> dict[str, Any]:
        """A new image's regions with the dataset's detector (as extraction stores them: float16 features, padded
        to the R of regions.h5), its block index and tag vectors as the model needs them."""
        from itmatch.features.detector import detect, preprocess
        from itmatch.features.extract import load_image
        from itmatch.features.regions_io import RegionsError, pad_regions

        model, meta, cfg = self.detector()
        try:
            img = load_image(path)
        except RegionsError as e:
            raise RetrieveError(str(e)) from None
        tensor, scale = preprocess(img, cfg)
        hw = (int(img.shape[0]), int(img.shape[1]))
        det = detect(model, [tensor.to(self.device)], [float(scale)], [hw], cfg)[0]  # numpy arrays
        row = pad_regions(det, self.corpus.R, hw, what=str(path))
        item: dict[str, Any] = {"features": row["features"], "index": -1}
        for key, dtype in IMAGE_META.items():
            if key in self.corpus.image_meta:
                item[key] = int(row[key]) if key == "num_regions" else np.asarray(row[key]).astype(dtype)
        if self.corpus.blocks is not None:
            from itmatch.features.blocks import compute_blocks

            K, L = int(self.corpus.info["blocks_K"]), int(self.corpus.info["blocks_L"])
            index, weight, _ = compute_blocks(row["boxes"][None], np.asarray(hw)[None], K, L,
                                              np.array([row["num_regions"]]))
            item["block_index"], item["block_weight"] = index[0].astype(np.int64), weight[0].astype(np.float32)
        if self.corpus.tags is not None:
            item["tag_vectors"] = self._tag_vectors(row, meta)
        return item

    def _tag_vectors(self, row: dict[str, np.ndarray], meta: dict[str, Any]) -> np.ndarray:
        """[R, H] vectors of the regions' tag phrases: the dataset's where it has the phrase, BERT's otherwise."""
        from itmatch.text.tags import embed_phrases, tag_phrases
        from itmatch.utils.h5 import open_h5, reading

        n = int(row["num_regions"])
        obj = [meta["object_names"][i] if 0 <= i < len(meta["object_names"]) else None for i in row["object_id"][:n]]
        att = [meta["attribute_names"][i] if 0 <= i < len(meta["attribute_names"]) else None
               for i in row["attribute_id"][:n]]
        phrases = tag_phrases(pd.DataFrame({"object": obj, "attribute": att}))
        with open_h5(self.corpus.paths.tags) as f, reading(self.corpus.paths.tags, "phrases"):
            table = {p.decode() if isinstance(p, bytes) else str(p): i for i, p in enumerate(f["phrases"][:])}
        out = np.zeros((self.corpus.R, self.corpus.tag_table.shape[1]), np.float32)
        new = sorted({p for p in phrases if p and p not in table})
        if new:
            tok, net = self.bert()
            vec = dict(zip(new, embed_phrases(new, tok, net).astype(np.float16).astype(np.float32), strict=True))
        for r, p in enumerate(phrases):
            if p:
                out[r] = self.corpus.tag_table[table[p]] if p in table else vec[p]
        return out

    def _fused(self, score_rows) -> np.ndarray:
        """Scores of every part (``score_rows(model)`` → 1-D array) fused as the evaluation fuses them."""
        out = None
        for k, m in enumerate(self.models):
            out = fuse_block(out, score_rows(m), k, len(self.models), self.weights)
        assert out is not None
        return out

    def _top(self, scores: np.ndarray, k: int) -> list[tuple[int, int, float]]:
        if k < 1:
            raise RetrieveError(f"--k must be at least 1, got {k}")
        order = np.argsort(-scores, kind="stable")[:k]
        return [(i + 1, int(j), float(scores[j])) for i, j in enumerate(order)]

    def _info(self) -> dict[str, Any]:
        return {"run": str(self.run.folder), "model": self.run.model, "dataset": self.run.dataset,
                "split": self.split}

    def text(self, text: str, k: int = 10) -> Result:
        """The ``k`` images of the split that best match ``text``."""
        if k < 1:
            raise RetrieveError(f"--k must be at least 1, got {k}")
        batch, query = self.caption_batch(text)
        rows = self.corpus.rows(self.split, "images")
        pin = self.device.type == "cuda"

        def score(m) -> np.ndarray:
            images = loader(RowDataset(self.corpus, rows, "images"), batch_size=self.image_chunk,
                            collate=collate_images, pin_memory=pin)
            return np.concatenate([s[:, 0] for s in score_batches(m, images, [batch], self.precision, None)])

        scores = self._fused(score)
        hits = []
        for rank, j, s in self._top(scores, k):
            r = int(rows[j])
            img = int(self.corpus.image_ids[r])
            first = self._first_caption.get(r)
            hits.append(Hit(rank, s, img, file=self.image_file[r],
                            text=self.caption_text[first] if first is not None else ""))
        return Result(query, hits, self._info())

    def image(self, query: str, k: int = 10) -> Result:
        """The ``k`` captions of the split that best match an image (an id of the dataset or an image file)."""
        if k < 1:
            raise RetrieveError(f"--k must be at least 1, got {k}")
        item, info = self.image_item(query)
        batch = collate_images([item])
        rows = self.corpus.rows(self.split, "captions")

        def score(m) -> np.ndarray:
            caps = loader(RowDataset(self.corpus, rows, "captions"), batch_size=self.caption_chunk,
                          collate=collate_captions)
            return next(score_batches(m, [batch], caps, self.precision, None))[0]

        scores = self._fused(score)
        own = info.get("image_id")
        hits = []
        for rank, j, s in self._top(scores, k):
            r = int(rows[j])
            img = int(self.corpus.image_ids[self.corpus.caption_image[r]])
            hits.append(Hit(rank, s, img, caption_id=int(self.corpus.caption_ids[r]), text=self.caption_text[r],
                            match=None if own is None else img == own))
        return Result(info, hits, self._info())


def format_table(result: Result) -> str:
    """The hits as an aligned text table for people."""
    q = result.query
    what = f'text "{q["text"]}"' if "text" in q else f"image {q.get('image_id', q.get('file'))}"
    head = f"{result.info['model']} on {result.info['dataset']} ({result.info['split']} split), {what}"
    lines = [head]
    if q.get("unknown_words"):
        lines.append(f"words outside the vocabulary (read as <unk>): {', '.join(q['unknown_words'])}")
    captions = bool(result.hits) and result.hits[0].caption_id is not None
    cols = (["rank", "score", "caption_id", "image_id", "match", "caption"] if captions
            else ["rank", "score", "image_id", "file", "caption"])
    rows = []
    for h in result.hits:
        if captions:
            mark = "" if h.match is None else ("yes" if h.match else "")
            rows.append([str(h.rank), f"{h.score:.4f}", str(h.caption_id), str(h.image_id), mark, h.text])
        else:
            rows.append([str(h.rank), f"{h.score:.4f}", str(h.image_id), h.file, h.text])
    if captions and all(h.match is None for h in result.hits):
        cols.remove("match")
        rows = [r[:4] + r[5:] for r in rows]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    fmt = "  ".join(f"{{:{'>' if c in ('rank', 'score') else '<'}{w}}}" for c, w in zip(cols, widths, strict=True))
    lines.append(fmt.format(*cols).rstrip())
    lines.extend(fmt.format(*r).rstrip() for r in rows)
    return "\n".join(lines) + "\n"
