"""Whole-dataset acquisition (download → extract → check → ingest) of miniature COCO / Flickr30K layouts."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile

import pandas as pd
import pytest
import yaml

from itmatch.data.acquire import AcquireError, acquire
from itmatch.data.image_check import BadImagesError
from itmatch.data.ingest import IngestOptions, ingest
from tests.conftest import REPO, run_snakemake
from tests.test_download_server import LocalServer, ServerState, make_mini_coco, make_mini_f30k_images, mini_f30k_json

FAST = {"retries": 3, "backoff": 0.01, "backoff_max": 0.05, "timeout": 5}


def _coco_download(base: str, files: dict[str, bytes], cache) -> dict:
    def src(name, **kw):
        return {"url": f"{base}/{name}", "size": len(files[name]),
                "sha256": hashlib.sha256(files[name]).hexdigest(), **kw}
    return {"cache": str(cache), **FAST, "json": src("caption_datasets.zip", member="dataset_coco.json"),
            "images": [src("train2014.zip", root=None), src("val2014.zip", root=None)]}


def _serve(files: dict[str, bytes]) -> ServerState:
    return ServerState(files={f"/{k}": v for k, v in files.items()})


def test_coco_download_extract_ingest_produces_contract_tables(tmp_path):
    files = make_mini_coco(tmp_path)
    state = _serve(files)
    res = tmp_path / "resources" / "coco"
    with LocalServer(state, max_seconds=60) as base:
        spec = _coco_download(base, files, tmp_path / "downloads")
        info = acquire("coco", spec, res / "dataset_coco.json", res / "images", res / ".verified",
                       res / "bad_images.txt")
        assert info["images_in_json"] == 6 and info["bad_images"] == 0
        # rerun: everything verified already, nothing is fetched again
        acquire("coco", spec, res / "dataset_coco.json", res / "images", res / ".verified", res / "bad_images.txt")
    assert sorted(r[0] for r in state.log) == ["/caption_datasets.zip", "/train2014.zip", "/val2014.zip"]
    assert sorted(p.name for p in (res / "images").iterdir()) == ["train2014", "val2014"]
    assert (res / "bad_images.txt").read_text().count("\n") == 1  # header only
    marker = json.loads((res / ".verified").read_text())
    assert marker["image_sources"][0]["verified"]["sha256"] == hashlib.sha256(files["train2014.zip"]).hexdigest()

    out = tmp_path / "results" / "data" / "coco"
    images, captions = ingest(res / "dataset_coco.json", res / "images", out / "images.parquet",
                              out / "captions.parquet", IngestOptions(), bad_images=res / "bad_images.txt")
    img = pd.read_parquet(out / "images.parquet")
    cap = pd.read_parquet(out / "captions.parquet")
    assert list(img.columns) == ["image_id", "split", "file", "width", "height"]
    assert list(cap.columns) == ["caption_id", "image_id", "split", "text"]
    assert img["split"].tolist() == ["train"] * 4 + ["val", "test"]  # restval counts as train
    assert img["file"].iloc[0] == "train2014/COCO_train2014_000000001000.jpg"
    assert img["image_id"].tolist()[:3] == [1000, 1001, 1002]
    assert len(cap) == 30 and (cap["image_id"].values == img["image_id"].repeat(5).values).all()


def test_corrupt_jpeg_fails_by_name_or_is_dropped_by_ingest(tmp_path, caplog):
    bad = "COCO_train2014_000000001001.jpg"
    files = make_mini_coco(tmp_path, corrupt=bad)
    res = tmp_path / "resources" / "coco"
    args = (res / "dataset_coco.json", res / "images", res / ".verified", res / "bad_images.txt")
    with LocalServer(_serve(files), max_seconds=60) as base:
        spec = _coco_download(base, files, tmp_path / "downloads")
        with pytest.raises(BadImagesError, match=rf"train2014/{bad}: cannot decode image"):
            acquire("coco", spec, *args)
        assert not (res / ".verified").exists()
        assert f"train2014/{bad}\tcannot decode image" in (res / "bad_images.txt").read_text()
        info = acquire("coco", spec, *args, on_bad_image="drop")
    assert info["bad_images"] == 1
    out = tmp_path / "results"
    with caplog.at_level(logging.WARNING, logger="itmatch"):
        images, captions = ingest(res / "dataset_coco.json", res / "images", out / "i.parquet", out / "c.parquet",
                                  IngestOptions(on_bad_image="drop", verify_images="header"),
                                  bad_images=res / "bad_images.txt")
    assert len(images) == 5 and len(captions) == 25
    assert f"train2014/{bad}" not in set(images["file"])
    assert "images dropped: listed in bad_images.txt: 1" in caplog.text


def _f30k_tar(folder) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.add(folder, arcname="flickr30k-images")
    return buf.getvalue()


def test_f30k_from_local_archive(tmp_path):
    make_mini_f30k_images(tmp_path / "src" / "flickr30k-images")
    archive = tmp_path / "flickr30k-images.tar.gz"
    archive.write_bytes(_f30k_tar(tmp_path / "src" / "flickr30k-images"))
    captions_zip = tmp_path / "caption_datasets.zip"
    captions_zip.write_bytes(make_mini_coco(tmp_path / "src")["caption_datasets.zip"])
    res = tmp_path / "resources" / "f30k"
    spec = {"cache": str(tmp_path / "downloads"), **FAST,
            "json": {"url": str(captions_zip), "member": "dataset_flickr30k.json"},
            "images": [{"url": f"file://{archive}", "root": "flickr30k-images",
                        "sha256": hashlib.sha256(archive.read_bytes()).hexdigest()}]}
    info = acquire("f30k", spec, res / "dataset_flickr30k.json", res / "images", res / ".verified",
                   res / "bad_images.txt")
    assert info["images_in_json"] == 4 and info["bad_images"] == 0
    assert sorted(p.name for p in (res / "images").iterdir()) == ["100.jpg", "101.jpg", "102.jpg", "103.jpg"]
    assert not (tmp_path / "downloads").exists() or not any((tmp_path / "downloads").iterdir())  # used in place
    assert info["image_sources"][0]["verified"]["sha256"] == spec["images"][0]["sha256"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [  # nothing written beside them
        "caption_datasets.zip", "flickr30k-images.tar.gz"]
    images, captions = ingest(res / "dataset_flickr30k.json", res / "images", tmp_path / "i.parquet",
                              tmp_path / "c.parquet")
    assert images["split"].tolist() == ["train", "train", "val", "test"] and len(captions) == 20


def test_f30k_from_unpacked_folder_and_plain_json(tmp_path):
    folder = tmp_path / "data" / "flickr30k-images"
    make_mini_f30k_images(folder)
    (tmp_path / "data" / "dataset_flickr30k.json").write_text(json.dumps(mini_f30k_json()))
    res = tmp_path / "resources" / "f30k"
    spec = {"json": {"url": str(tmp_path / "data" / "dataset_flickr30k.json")},
            "images": [{"url": str(tmp_path / "data"), "root": "flickr30k-images"}]}
    acquire("f30k", spec, res / "dataset_flickr30k.json", res / "images", res / ".verified", res / "bad_images.txt")
    assert (res / "images").is_symlink() and (res / "images").resolve() == folder.resolve()  # nothing copied
    images, _ = ingest(res / "dataset_flickr30k.json", res / "images", tmp_path / "i.parquet", tmp_path / "c.parquet")
    assert len(images) == 4
    # the folder itself (root not inside it) works too
    spec["images"][0]["url"] = str(folder)
    acquire("f30k", spec, res / "dataset_flickr30k.json", res / "images", res / ".verified", res / "bad_images.txt")
    assert (res / "images").resolve() == folder.resolve()


def test_mixed_sources_remote_zip_and_local_folder(tmp_path):
    """COCO train2014 from the server, val2014 from an unpacked folder holding val2014/ (linked)."""
    import zipfile

    files = make_mini_coco(tmp_path / "src")
    with zipfile.ZipFile(io.BytesIO(files["val2014.zip"])) as zf:
        zf.extractall(tmp_path / "unpacked")
    res = tmp_path / "resources" / "coco"
    with LocalServer(_serve(files), max_seconds=60) as base:
        spec = _coco_download(base, files, tmp_path / "downloads")
        spec["images"][1] = {"url": str(tmp_path / "unpacked")}
        info = acquire("coco", spec, res / "dataset_coco.json", res / "images", res / ".verified",
                       res / "bad_images.txt")
    assert info["bad_images"] == 0
    assert (res / "images" / "val2014").is_symlink() and not (res / "images" / "train2014").is_symlink()


def test_f30k_without_image_source_names_the_config_key(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps(mini_f30k_json()))
    spec = {"json": {"url": str(tmp_path / "d.json")}, "images": [{"url": None, "root": "flickr30k-images"}]}
    with pytest.raises(AcquireError, match=r"config key datasets.f30k.download.images\[0\].url is not set"):
        acquire("f30k", spec, tmp_path / "j.json", tmp_path / "images", tmp_path / ".verified", tmp_path / "b.txt")
    assert not (tmp_path / "images").exists() and not (tmp_path / ".verified").exists()


def test_shipped_config_defaults():
    with open(REPO / "config" / "config.yaml") as fh:
        cfg = yaml.safe_load(fh)["datasets"]
    coco, f30k = cfg["coco"]["download"], cfg["f30k"]["download"]
    assert [s["url"].rsplit("/", 1)[1] for s in coco["images"]] == ["train2014.zip", "val2014.zip"]
    assert coco["json"]["member"] == "dataset_coco.json" and f30k["json"]["member"] == "dataset_flickr30k.json"
    assert all(s["sha256"] is None for s in [coco["json"], *coco["images"]])  # none published: not invented
    assert f30k["images"][0]["url"] is None  # Flickr30K is distributed on request


def test_workflow_downloads_from_mirror_then_skips(tmp_path):
    """Snakemake: config points COCO at a local 'mirror'; ingest runs; a second run has nothing to do."""
    files = make_mini_coco(tmp_path / "src")
    state = _serve(files)
    with LocalServer(state, max_seconds=240, max_requests=20) as base:
        override = tmp_path / "mirror.yaml"
        override.write_text(yaml.safe_dump({"datasets": {"coco": {"download": _coco_download(
            base, files, "resources/downloads")}}}))
        configs = [str(REPO / "config" / "config.yaml"), str(REPO / ".test" / "config" / "config.yaml"),
                   str(override)]
        work = tmp_path / "work"
        run_snakemake(work, "--configfile", *configs, "--", "results/data/coco/captions.parquet", timeout=600)
        assert len(pd.read_parquet(work / "results/data/coco/captions.parquet")) == 30
        assert "train2014.zip" in (work / "logs/download/coco.log").read_text()
        again = run_snakemake(work, "-n", "--configfile", *configs, "--", "results/data/coco/captions.parquet")
    assert "Nothing to be done" in again.stdout + again.stderr
    assert len(state.log) == 3
