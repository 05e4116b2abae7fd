"""Ingest: contract schemas, caption order, and a clear error for each kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from itmatch.data.ingest import CAPTIONS_SCHEMA, IMAGES_SCHEMA, IngestError, IngestOptions, ingest


def make_dataset(root: Path, splits=("train", "restval", "val", "test", "train", "test"), captions: int = 5) -> Path:
    """A small Karpathy-format dataset: one image per entry of ``splits``, ``captions`` captions each."""
    images, sentid = [], 100
    for i, split in enumerate(splits):
        folder = "val2014" if i % 2 else "train2014"
        (root / folder).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20 + i, 10 + i), (i * 30, 0, 0)).save(root / folder / f"img{i}.jpg")
        sents = [{"raw": f"Image {i} caption {k}.", "sentid": sentid + k, "imgid": i} for k in range(captions)]
        sentid += captions
        images.append({"filepath": folder, "filename": f"img{i}.jpg", "imgid": i, "cocoid": 1000 + i,
                       "split": split, "sentences": sents})
    path = root / "dataset.json"
    path.write_text(json.dumps({"dataset": "coco", "images": images}))
    return path


def run(root: Path, json_path: Path | None = None, **opts):
    return ingest(json_path or root / "dataset.json", root, root / "out" / "images.parquet",
                  root / "out" / "captions.parquet", IngestOptions(**opts))


def edit(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data["images"])
    path.write_text(json.dumps(data))


def test_tables_follow_the_contract(tmp_path):
    make_dataset(tmp_path)
    run(tmp_path)
    images = pq.read_table(tmp_path / "out" / "images.parquet")
    captions = pq.read_table(tmp_path / "out" / "captions.parquet")
    assert images.schema.equals(IMAGES_SCHEMA) and captions.schema.equals(CAPTIONS_SCHEMA)
    im, cap = images.to_pandas(), captions.to_pandas()
    # grouped by split (restval counted as train), JSON order inside a split
    assert im["split"].tolist() == ["train", "train", "train", "val", "test", "test"]
    assert im["image_id"].tolist() == [1000, 1001, 1004, 1002, 1003, 1005]
    assert im["file"].tolist()[:2] == ["train2014/img0.jpg", "val2014/img1.jpg"]
    assert im[["width", "height"]].values.tolist()[0] == [20, 10]
    for split in ("train", "val", "test"):
        ids = im.loc[im.split == split, "image_id"].tolist()
        caps = cap.loc[cap.split == split, "image_id"].tolist()
        assert caps == [i for i in ids for _ in range(5)]  # captions 5i..5i+4 belong to image i
    assert cap["text"].iloc[0] == "Image 0 caption 0."


def test_malformed_json(tmp_path):
    (tmp_path / "dataset.json").write_text('{"images": [ {"filename": "a.jpg",, } ]}')
    with pytest.raises(IngestError, match=r"dataset.json: malformed JSON at line 1, column \d+"):
        run(tmp_path)


def test_missing_image_file(tmp_path):
    make_dataset(tmp_path)
    (tmp_path / "val2014" / "img3.jpg").unlink()
    with pytest.raises(IngestError, match=r"val2014/img3.jpg \(image id 1003\): missing image file"):
        run(tmp_path)


def test_undecodable_image(tmp_path):
    make_dataset(tmp_path)
    (tmp_path / "train2014" / "img2.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(IngestError, match=r"train2014/img2.jpg \(image id 1002\): cannot decode image"):
        run(tmp_path)


def test_bad_image_dropped_when_configured(tmp_path, caplog):
    make_dataset(tmp_path)
    (tmp_path / "train2014" / "img2.jpg").write_bytes(b"garbage")
    images, captions = run(tmp_path, on_bad_image="drop")
    assert 1002 not in images["image_id"].tolist() and 1002 not in captions["image_id"].tolist()
    assert len(captions) == 5 * len(images) == 25
    assert "images dropped: cannot decode image: 1" in caplog.text


def test_image_without_captions(tmp_path):
    path = make_dataset(tmp_path)
    edit(path, lambda imgs: imgs[1].update(sentences=[]))
    with pytest.raises(IngestError, match=r"images\[1\] \(img1.jpg, id 1001\) has no captions"):
        run(tmp_path)


def test_wrong_caption_count_error_and_drop(tmp_path, caplog):
    path = make_dataset(tmp_path)
    edit(path, lambda imgs: imgs[3]["sentences"].pop())
    with pytest.raises(IngestError, match=r"images\[3\] \(img3.jpg, id 1003\) has 4 captions, expected 5"):
        run(tmp_path)
    images, captions = run(tmp_path, on_bad_caption_count="drop")
    assert 1003 not in images["image_id"].tolist() and len(captions) == 25
    assert "images dropped: caption count != 5: 1" in caplog.text


def test_extra_captions_truncated_only_when_configured(tmp_path):
    path = make_dataset(tmp_path)
    edit(path, lambda imgs: imgs[0]["sentences"].append({"raw": "extra", "sentid": 999}))
    with pytest.raises(IngestError, match="has 6 captions, expected 5"):
        run(tmp_path)
    _, captions = run(tmp_path, truncate_extra_captions=True)
    assert "extra" not in captions["text"].tolist()


def test_unknown_split(tmp_path):
    path = make_dataset(tmp_path)
    edit(path, lambda imgs: imgs[2].update(split="dev"))
    with pytest.raises(IngestError, match=r"images\[2\] \(img2.jpg\) has unknown split 'dev'; allowed: restval, test"):
        run(tmp_path)


def test_duplicate_ids(tmp_path):
    path = make_dataset(tmp_path)
    edit(path, lambda imgs: imgs[4].update(cocoid=1001))
    with pytest.raises(IngestError, match=r"images\[4\] \(img4.jpg\) duplicates image id 1001 of images\[1\]"):
        run(tmp_path)
    path = make_dataset(tmp_path)
    edit(path, lambda imgs: imgs[5]["sentences"][0].update(sentid=100))
    with pytest.raises(IngestError, match=r"images\[5\] \(img5.jpg\) sentences\[0\] duplicates sentid 100"):
        run(tmp_path)


def test_missing_field(tmp_path):
    path = make_dataset(tmp_path)
    edit(path, lambda imgs: imgs[0].pop("split"))
    with pytest.raises(IngestError, match=r"images\[0\] \(img0.jpg\) has no 'split' field"):
        run(tmp_path)


def test_failed_ingest_leaves_no_output(tmp_path):
    make_dataset(tmp_path)
    (tmp_path / "val2014" / "img1.jpg").unlink()
    with pytest.raises(IngestError):
        run(tmp_path)
    out = tmp_path / "out"
    assert not out.exists() or not any(out.iterdir())  # neither final nor temporary files


def test_grayscale_cmyk_palette_alpha_accepted(tmp_path):
    make_dataset(tmp_path)
    for i, mode in zip(range(4), ["L", "CMYK", "P", "RGBA"], strict=True):
        folder = "val2014" if i % 2 else "train2014"
        fmt = "PNG" if mode in {"P", "RGBA"} else "JPEG"
        Image.new(mode, (8, 8)).save(tmp_path / folder / f"img{i}.jpg", format=fmt)
    images, _ = run(tmp_path)
    assert len(images) == 6


# issue 21 item 6: wrong field types and escaping paths are named errors (no TypeError / AttributeError,
# no 0.7 -> 0, no true -> 1, no file outside the image folder)
BAD_FIELDS = [
    (lambda e: e.update(sentences=None), r"images\[2\] \(img2.jpg\) field 'sentences' must be a list of caption "
                                         r"objects, got null"),
    (lambda e: e.update(filename=123), r"images\[2\] \(\?\) field 'filename' must be a string, got integer 123"),
    (lambda e: e["sentences"][1].update(raw=123), r"images\[2\] \(img2.jpg\) sentences\[1\] field 'raw' must be a "
                                                  r"string, got integer 123"),
    (lambda e: e.update(cocoid=0.7), r"images\[2\] \(img2.jpg\) field 'cocoid' must be an integer, got number 0.7"),
    (lambda e: e.update(cocoid=True), r"images\[2\] \(img2.jpg\) field 'cocoid' must be an integer, got boolean true"),
    (lambda e: (e.pop("cocoid"), e.update(imgid="7")), r"images\[2\] \(img2.jpg\) field 'imgid' must be an integer, "
                                                      r"got string \"7\""),
    (lambda e: (e.pop("cocoid"), e.pop("imgid")), r"images\[2\] \(img2.jpg\) has no 'cocoid' or 'imgid' field"),
    (lambda e: e.update(cocoid=2 ** 70), r"images\[2\] \(img2.jpg\) field 'cocoid' is out of the 64-bit integer"),
    (lambda e: e["sentences"][0].update(sentid="x"), r"images\[2\] \(img2.jpg\) sentences\[0\] field 'sentid' must "
                                                     r"be an integer, got string \"x\""),
    (lambda e: e.update(split=["train"]), r"images\[2\] \(img2.jpg\) field 'split' must be a string, got list"),
    (lambda e: e.update(filepath=5), r"images\[2\] \(img2.jpg\) field 'filepath' must be a string, got integer 5"),
    (lambda e: e.update(filename="../../x.jpg"), r"images\[2\] \(\.\./\.\./x.jpg\) file 'train2014/\.\./\.\./x.jpg' "
                                                 r"is an absolute path or leaves the image folder"),
    (lambda e: e.update(filename="/etc/hostname"), r"images\[2\] \(/etc/hostname\) file '/etc/hostname' is an "
                                                   r"absolute path"),
    (lambda e: e.update(filepath="/etc"), r"images\[2\] \(img2.jpg\) file '/etc/img2.jpg' is an absolute path"),
    (lambda e: e.update(filename=""), r"images\[2\] \(\) has an empty or invalid 'filename'"),
    (lambda e: e["sentences"][3].update(raw="caption \ud800"), r"images\[2\] \(img2.jpg\) sentences\[3\] field 'raw' "
                                                               r"is not valid Unicode"),
]


@pytest.mark.parametrize(("mutate", "message"), BAD_FIELDS, ids=[m for _, m in BAD_FIELDS])
def test_wrong_types_and_escaping_paths_are_named(tmp_path, mutate, message):
    path = make_dataset(tmp_path)
    edit(path, lambda imgs: mutate(imgs[2]))
    with pytest.raises(IngestError, match=rf"dataset.json: {message}"):
        run(tmp_path)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_image_check_refuses_escaping_paths_too(tmp_path):
    from itmatch.data.image_check import check_images

    path = make_dataset(tmp_path)
    edit(path, lambda imgs: imgs[1].update(filename="../../../etc/hostname"))
    with pytest.raises(IngestError, match=r"images\[1\] .* leaves the image folder"):
        check_images(path, tmp_path, tmp_path / "bad.txt")


STREAM_DOCS = ['{"images": [1, 2.5e3, "x\\ud800", {"a": [1, 2, {"b": null}]}, true, -0.0], "dataset": "c"}',
               '{"dataset": {"x": [1, 2]}, "images": []}', '  {  "images"  :  [  "a" , "b" ]  }  ',
               '{"images": [123456789012345678901234567890, NaN, -Infinity, 1e400]}']
NOT_STREAMED = ['{"images": [1], "images": [2]}', '[1]', '{"images": {"a": 1}}', '{"images": [1,]}',
                '{"images": [1] } x', '{"dataset": "c"}', '{"images": [1, 2]', '{"images": [1 2]}',
                '\ufeff{"images": []}']


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1 << 20])
def test_streamed_json_items_are_json_loads_items(tmp_path, chunk):
    """The streaming reader gives exactly json.load's items whatever the read size (values cut at every place),
    and refuses (for json.load to read or to report) every other layout or malformed text."""
    from itmatch.utils.jsonstream import Unstreamable, stream_array

    path = tmp_path / "d.json"
    for doc in STREAM_DOCS:
        path.write_text(doc, encoding="utf-8")
        assert repr(list(stream_array(path, "images", chunk))) == repr(json.loads(doc)["images"]), doc
    for doc in NOT_STREAMED:
        path.write_text(doc, encoding="utf-8")
        with pytest.raises(Unstreamable):
            list(stream_array(path, "images", chunk))
    path.write_bytes(b'{"images": ["caf\xe9"]}')  # Latin-1, not UTF-8
    with pytest.raises(UnicodeDecodeError):
        list(stream_array(path, "images", chunk))
