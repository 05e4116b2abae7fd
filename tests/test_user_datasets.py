"""Datasets by declaration (docs/data.md "Your own data"): the captions and images kinds' ingest, their bad-input
messages, dataset-name validation, per-dataset settings for any declared name, and the detector a dataset uses."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from itmatch.config import ConfigError, dataset_settings, has_captions, validate_config
from itmatch.data.folders import SplitRatio, assign_splits, ingest_captions, ingest_images
from itmatch.data.ingest import CAPTIONS_SCHEMA, IMAGES_SCHEMA, IngestError, IngestOptions
from itmatch.data.shapes import ShapesSpec, make_image
from tests.conftest import REPO


def shapes_folder(root: Path, n: int, suffix: str = ".png", seed: int = 5) -> list[list[str]]:
    """``n`` shapes scenes saved as ``root/img{i}{suffix}``; their five captions each."""
    root.mkdir(parents=True, exist_ok=True)
    spec = ShapesSpec(seed=seed, image_size=64)
    captions = []
    for i in range(n):
        img, _, sentences = make_image(spec, i)
        img.save(root / f"img{i}{suffix}")
        captions.append([s["raw"] for s in sentences])
    return captions


def write_table(path: Path, rows: list[dict]) -> Path:
    frame = pd.DataFrame(rows)
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        frame.to_parquet(path)
    return path


def caption_rows(captions: list[list[str]], split: list[str] | None = None) -> list[dict]:
    return [{"file": f"img{i}.png", "caption": c, **({"split": split[i]} if split else {})}
            for i, caps in enumerate(captions) for c in caps]


def outputs(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "out" / "images.parquet", tmp_path / "out" / "captions.parquet"


def test_images_kind_lists_the_folder(tmp_path):
    shapes_folder(tmp_path / "pics" / "sub", 2)
    shapes_folder(tmp_path / "pics", 3, seed=6)
    (tmp_path / "pics" / "README.txt").write_text("not an image")
    (tmp_path / "pics" / ".hidden.png").write_bytes(b"skipped")
    im_out, cap_out = outputs(tmp_path)
    images, captions = ingest_images(tmp_path / "pics", im_out, cap_out)
    assert pq.read_schema(im_out).equals(IMAGES_SCHEMA) and pq.read_schema(cap_out).equals(CAPTIONS_SCHEMA)
    assert images["file"].tolist() == ["img0.png", "img1.png", "img2.png", "sub/img0.png", "sub/img1.png"]
    assert images["image_id"].tolist() == [0, 1, 2, 3, 4] and set(images["split"]) == {"test"}
    assert images[["width", "height"]].values.tolist() == [[64, 64]] * 5
    assert len(captions) == 0 and len(pq.read_table(cap_out)) == 0


def test_images_kind_file_list(tmp_path):
    shapes_folder(tmp_path / "pics", 4)
    listing = tmp_path / "list.txt"
    listing.write_text("# my picks\nimg3.png\n\nimg1.png\n")
    images, _ = ingest_images(tmp_path / "pics", *outputs(tmp_path), files=listing)
    assert images["file"].tolist() == ["img1.png", "img3.png"]
    listing.write_text("img1.png\nimg9.png\n")
    with pytest.raises(IngestError, match=r"list\.txt: 1 listed image\(s\) do not exist under .*pics:\n  line 2: "
                                          r"img9\.png"):
        ingest_images(tmp_path / "pics", *outputs(tmp_path / "b"), files=listing)


def test_unreadable_image_is_named_and_nothing_is_written(tmp_path):
    shapes_folder(tmp_path / "pics", 3)
    (tmp_path / "pics" / "img1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    im_out, cap_out = outputs(tmp_path)
    with pytest.raises(IngestError, match=r"1 unusable image\(s\) under .*pics .*\n  .*pics/img1\.png \(image id 1\): "
                                          r"cannot decode image"):
        ingest_images(tmp_path / "pics", im_out, cap_out)
    assert not im_out.exists() and not cap_out.exists()
    images, _ = ingest_images(tmp_path / "pics", im_out, cap_out, IngestOptions(on_bad_image="drop"))
    assert images["file"].tolist() == ["img0.png", "img2.png"]


def test_empty_folder(tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "notes.txt").write_text("x")
    with pytest.raises(IngestError, match=r"pics: no image files \(suffixes .jpg"):
        ingest_images(tmp_path / "pics", *outputs(tmp_path))


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_captions_kind_tables(tmp_path, suffix):
    caps = shapes_folder(tmp_path / "pics", 4)
    splits = ["train", "train", "val", "test"]
    table = write_table(tmp_path / f"caps{suffix}", caption_rows(caps, splits))
    images, captions = ingest_captions(table, tmp_path / "pics", *outputs(tmp_path))
    assert images["split"].tolist() == splits and images["image_id"].tolist() == [0, 1, 2, 3]
    # captions 5i..5i+4 belong to image i; caption ids = table rows (0-based)
    assert captions["image_id"].tolist() == [i for i in range(4) for _ in range(5)]
    assert captions["caption_id"].tolist() == list(range(20))
    assert captions["text"].tolist() == [c for cs in caps for c in cs]


def test_seeded_split_when_the_table_has_none(tmp_path):
    caps = shapes_folder(tmp_path / "pics", 30)
    table = write_table(tmp_path / "caps.csv", caption_rows(caps))
    ratio = SplitRatio(seed=3, val=0.1, test=0.2)
    images, captions = ingest_captions(table, tmp_path / "pics", *outputs(tmp_path), ratio=ratio)
    assert images["split"].value_counts().to_dict() == {"train": 21, "test": 6, "val": 3}
    assert images["split"].tolist() == sorted(images["split"], key=["train", "val", "test"].index)
    again, _ = ingest_captions(table, tmp_path / "pics", *outputs(tmp_path / "again"), ratio=ratio)
    assert again.equals(images)
    assert assign_splits(30, ratio) != assign_splits(30, SplitRatio(seed=4, val=0.1, test=0.2))
    assert assign_splits(3, SplitRatio(0, 0.01, 0.01)).count("train") == 1  # at least one val and one test
    with pytest.raises(IngestError, match="2 images are too few for a split with val 0.1 and test 0.1"):
        assign_splits(2, SplitRatio(0, 0.1, 0.1))
    for split in ("train", "val", "test"):  # captions follow their images' splits
        ids = images.loc[images.split == split, "image_id"].tolist()
        assert captions.loc[captions.split == split, "image_id"].tolist() == [i for i in ids for _ in range(5)]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_missing_column_names_file_column_and_found_columns(tmp_path, suffix):
    caps = shapes_folder(tmp_path / "pics", 2)
    rows = [{"file": r["file"], "text": r["caption"]} for r in caption_rows(caps)]
    table = write_table(tmp_path / f"caps{suffix}", rows)
    im_out, cap_out = outputs(tmp_path)
    with pytest.raises(IngestError, match=rf"caps\{suffix}: no column 'caption' \(found columns: file, text\)"):
        ingest_captions(table, tmp_path / "pics", im_out, cap_out)
    assert not im_out.exists() and not cap_out.exists()


def test_caption_naming_a_missing_image(tmp_path):
    caps = shapes_folder(tmp_path / "pics", 3)
    rows = caption_rows(caps)
    rows[11]["file"] = "img7.png"  # row 12 (counted from 1, header excluded)
    table = write_table(tmp_path / "caps.csv", rows)
    with pytest.raises(IngestError, match=r"caps\.csv: 1 image\(s\) named in column 'file' do not exist under "
                                          r".*pics .*\n  row 12: img7\.png"):
        ingest_captions(table, tmp_path / "pics", *outputs(tmp_path), IngestOptions(captions_per_image=1,
                                                                                    truncate_extra_captions=True))


@pytest.mark.parametrize(("edit", "message"), [
    (lambda rows: rows[3].update(caption=""), r"caps\.csv row 4: column 'caption' is empty"),
    (lambda rows: rows[0].update(file="../etc/passwd"), r"caps\.csv row 1: 'file' '\.\./etc/passwd' is an absolute "
                                                        r"path or leaves the image folder"),
    (lambda rows: [r.update(split="train") for r in rows] and rows[7].update(split="tset"),
     r"caps\.csv row 8: unknown split 'tset' in column 'split'; allowed: train, val, test, restval"),
    (lambda rows: [r.update(split="train") for r in rows] and rows[2].update(split="test"),
     r"caps\.csv row 3: split 'test' differs from 'train' of row 1 for the same image img0\.png"),
    (lambda rows: rows.pop(4), r"caps\.csv: image img0\.png \(first at row 1\) has 4 captions, expected 5"),
])
def test_bad_rows_are_named(tmp_path, edit, message):
    caps = shapes_folder(tmp_path / "pics", 3)
    rows = caption_rows(caps)
    edit(rows)
    table = write_table(tmp_path / "caps.csv", rows)
    with pytest.raises(IngestError, match=message):
        ingest_captions(table, tmp_path / "pics", *outputs(tmp_path))


def test_unknown_table_format(tmp_path):
    (tmp_path / "caps.xlsx").write_bytes(b"")
    with pytest.raises(IngestError, match=r"caps\.xlsx: unknown captions table format '\.xlsx'; use one of \.csv, "
                                          r"\.tsv, \.jsonl, \.parquet"):
        ingest_captions(tmp_path / "caps.xlsx", tmp_path, *outputs(tmp_path))


# ---- config: declaration, names, per-dataset settings -------------------------------------------------------

@pytest.fixture()
def config() -> dict:
    with open(REPO / "config" / "config.yaml") as fh:
        return yaml.safe_load(fh)


def test_declared_datasets_validate_with_kind_defaults(config):
    cfg = copy.deepcopy(config)
    cfg["datasets"]["pics"] = {"kind": "images", "images": "my_photos"}
    cfg["datasets"]["mine"] = {"kind": "captions", "images": "my_photos", "captions": "caps.csv",
                               "split": {"val": "0.2"}}  # --config gives strings
    cfg["training"]["datasets"]["mine"] = {"epochs": 3}
    cfg["models"]["pfan"]["datasets"]["mine"] = {"embed_dim": 64}
    cfg["detector"]["per_dataset"]["pics"] = {"inference": {"min_size": 300}}
    validate_config(cfg)
    assert dataset_settings(cfg, "mine")["split"] == {"seed": 0, "val": 0.2, "test": 0.1}
    assert dataset_settings(cfg, "pics") == {"kind": "images", "images": "my_photos", "files": None}
    assert dataset_settings(cfg, "coco")["kind"] == "karpathy" and dataset_settings(cfg, "shapes")["kind"] == "shapes"
    assert [has_captions(cfg, d) for d in ("pics", "mine", "coco", "shapes")] == [False, True, True, True]


@pytest.mark.parametrize(("name", "block", "message"), [
    ("report", {"kind": "images", "images": "x"},
     r"config key datasets\.report: the name 'report' is reserved: results/report/ is one of the workflow's own "
     r"folders"),
    ("features", {"kind": "images", "images": "x"}, r"the name 'features' is reserved"),
    ("pfan", {"kind": "images", "images": "x"}, r"the name 'pfan' is reserved"),
    ("my/photos", {"kind": "images", "images": "x"}, r"config key datasets\.my/photos: the name 'my/photos' contains "
                                                     r"'/'"),
    ("my photos", {"kind": "images", "images": "x"}, r"the name 'my photos' is not a valid name: letters, digits"),
    ("mine", {"images": "x"}, r"config key datasets\.mine\.kind: required but missing"),
    ("mine", {"kind": "folder", "images": "x"}, r"datasets\.mine\.kind: 'folder' is not allowed; allowed values: "
                                                r"karpathy, captions, images, precomp"),
    ("mine", {"kind": "captions", "images": "x"}, r"config key datasets\.mine\.captions: required but missing"),
    ("mine", {"kind": "images", "images": "x", "captions": "c.csv"},
     r"config key datasets\.mine\.captions: unknown; allowed keys here: files, images, ingest, kind"),
    ("mine", {"kind": "captions", "images": "x", "captions": "c.csv", "split": {"val": 0.5, "test": 0.5}},
     r"config key datasets\.mine\.split: val 0\.5 \+ test 0\.5 leave no train images"),
])
def test_bad_declarations_are_refused(config, name, block, message):
    cfg = copy.deepcopy(config)
    cfg["datasets"][name] = block
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)


def test_per_dataset_settings_name_declared_datasets_only(config):
    cfg = copy.deepcopy(config)
    cfg["training"]["datasets"]["mine"] = {"epochs": 3}
    with pytest.raises(ConfigError, match=r"config key training\.datasets\.mine: unknown; allowed keys here: coco, "
                                          r"f30k, shapes \(the datasets under config key datasets\)"):
        validate_config(cfg)
    cfg = copy.deepcopy(config)
    cfg["datasets"]["pics"] = {"kind": "images", "images": "x"}
    cfg["report"]["datasets"] = ["shapes", "pics"]
    with pytest.raises(ConfigError, match=r"report\.datasets: 'pics' is kind 'images' .*no captions"):
        validate_config(cfg)
    cfg["report"]["datasets"] = ["shapes"]
    cfg["text"]["trees"]["parser"]["pics"] = "gold"
    with pytest.raises(ConfigError, match=r"text\.trees\.parser\.pics: 'gold' reads the parses of a dataset JSON"):
        validate_config(cfg)


def test_detector_checkpoint_of_a_declared_dataset(config):
    from itmatch.features.detector import checkpoint_path

    det = copy.deepcopy(config["detector"])
    assert checkpoint_path(det, "mine", must_exist=False) == "results/detector/shapes/model.pt"  # the default
    det["checkpoints"]["mine"] = "weights/bua.pth"
    assert checkpoint_path(det, "mine", must_exist=False) == "weights/bua.pth"
    del det["checkpoints"]["mine"]
    det["default_checkpoint"] = None
    with pytest.raises(FileNotFoundError, match=r"config key detector\.default_checkpoint is not set \(dataset "
                                                r"'mine' has no detector\.checkpoints entry\)"):
        checkpoint_path(det, "mine")
    with pytest.raises(FileNotFoundError, match=r"config key detector\.checkpoints\.coco is not set"):
        checkpoint_path(det, "coco")  # a built-in dataset's explicit null is not replaced by the default
