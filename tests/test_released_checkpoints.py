"""Released SCAN / PFAN checkpoints import and score equal to the official code (tests/fixtures/released).

The fixtures were made by the official model classes (kuanghuei/SCAN ``model.py``, PFAN's ``model_attention.py``),
filled from a seed, saved in the released layout, with the official scoring functions' similarities on fixed
inputs stored beside them (README there). Here only our side runs: import, score the same inputs, compare.
"""

from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from itmatch.cli import main
from itmatch.models.checkpoint import load_parts
from itmatch.models.registry import build_model
from itmatch.models.released import ReleasedCheckpointError, convert, import_run, read_released

FIX = Path(__file__).parent / "fixtures" / "released"
NAMES = ("scan_t2i", "scan_i2t", "pfan_t2i", "pfan_i2t")


def _inputs() -> dict[str, np.ndarray]:
    with np.load(FIX / "released_inputs.npz") as z:
        return dict(z)


def _scores(model, inp: dict[str, np.ndarray]) -> np.ndarray:
    images = torch.from_numpy(inp["images"])
    boxes = torch.from_numpy(inp["boxes"])
    L = boxes.shape[-1] // 2
    img = {"features": images, "num_regions": torch.full((images.shape[0],), images.shape[1]),
           "block_index": boxes[..., :L].round().long(), "block_weight": boxes[..., L:]}
    cap = {"tokens": torch.from_numpy(inp["tokens"]), "lengths": torch.from_numpy(inp["lengths"])}
    model.eval()
    with torch.no_grad():
        return model.score(model.encode_images(img), model.encode_captions(cap)).double().numpy()


@pytest.mark.parametrize("name", NAMES)
def test_imported_scores_equal_official_code(name):
    inp = _inputs()
    part = convert(name.split("_")[0], FIX / f"{name}_model_best.pth.tar")
    model = build_model(name.split("_")[0], part["config"], part["data_info"])
    model.load_state_dict(part["state_dict"])
    ours, theirs = _scores(model, inp), inp[f"sims_{name}"]
    assert ours.shape == theirs.shape == (5, 7)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-7)
    assert part["config"]["direction"] == name.split("_")[1]
    assert part["config"]["tokens"]["start_end"] is True
    if name.startswith("pfan"):
        assert part["data_info"]["blocks_K"] == 16 and part["config"]["block_dim"] == 8
        assert part["config"]["position_norm"] == "softmax" and part["config"]["position_bias"] is True
        assert part["config"]["max_term"] == (0.5 if name.endswith("t2i") else 0.0)
    # the released settings are really needed: without PFAN's variants the scores differ
    if name == "pfan_t2i":
        cfg = {**part["config"], "max_term": 0.0}
        m2 = build_model("pfan", cfg, part["data_info"])
        m2.load_state_dict(part["state_dict"])
        assert not np.allclose(_scores(m2, inp), theirs, rtol=1e-3)


@pytest.mark.parametrize("kind", ["scan", "pfan"])
def test_fused_import_run_averages_like_the_papers(tmp_path, kind):
    inp = _inputs()
    files = [FIX / f"{kind}_{d}_model_best.pth.tar" for d in ("t2i", "i2t")]
    rec = import_run(kind, files, "f30k_precomp", tmp_path / "run")
    assert rec["settings"]["fuse"] == ["t2i", "i2t"]
    assert rec["settings"]["t2i"]["agg"] == ("LogSumExp" if kind == "scan" else "Mean")
    saved = json.loads((tmp_path / "run" / "import.json").read_text())
    assert saved["model"] == kind and saved["dataset"] == "f30k_precomp" and len(saved["files"]) == 2
    name, models = load_parts(tmp_path / "run" / "model.pt")
    assert name == kind and len(models) == 2
    fused = sum(_scores(m, inp) for m in models) / 2
    expected = (inp[f"sims_{kind}_t2i"] + inp[f"sims_{kind}_i2t"]) / 2
    np.testing.assert_allclose(fused, expected, rtol=1e-5, atol=1e-7)


def _resave(tmp_path: Path, ck: dict, name: str = "bad.pth.tar", **kw) -> Path:
    path = tmp_path / name
    torch.save(ck, path, **kw)
    return path


def test_new_zip_format_reads_the_same(tmp_path):
    ck = read_released(FIX / "scan_t2i_model_best.pth.tar")  # legacy serialisation, as PyTorch 0.4 wrote
    assert isinstance(ck["opt"], argparse.Namespace) and ck["epoch"] == 7
    p = _resave(tmp_path, ck, "zip.pth.tar")
    a, b = convert("scan", FIX / "scan_t2i_model_best.pth.tar"), convert("scan", p)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def _bad(tmp_path: Path, edit) -> Path:
    ck = read_released(FIX / "pfan_t2i_model_best.pth.tar")
    edit(ck)
    return _resave(tmp_path, ck)


@pytest.mark.parametrize("edit, message", [
    (lambda ck: ck["model"][0].pop("fc_att.bias"), "image-encoder state: missing fc_att.bias (1)"),
    (lambda ck: ck["model"][1].update({"rnn.weight_ih_l1": torch.zeros(1), "extra": torch.zeros(1)}),
     "text-encoder state: unexpected rnn.weight_ih_l1, extra (2)"),
    (lambda ck: [ck["model"][1].pop(k) for k in list(ck["model"][1]) if "reverse" in k],
     "text-encoder state: missing rnn.weight_ih_l0_reverse, rnn.weight_hh_l0_reverse, rnn.bias_ih_l0_reverse … (4)"),
    (lambda ck: setattr(ck["opt"], "bi_gru", False), "opt.bi_gru is false"),
    (lambda ck: setattr(ck["opt"], "raw_feature_norm", "l1norm"), "opt.raw_feature_norm = 'l1norm'"),
    (lambda ck: setattr(ck["opt"], "img_dim", 2048), "opt.img_dim = 2048 but the image encoder reads 32-d"),
    (lambda ck: delattr(ck["opt"], "cross_attn"), "opt has no 'cross_attn'"),
    (lambda ck: ck.pop("opt"), "expected keys 'model' and 'opt'"),
    (lambda ck: ck.update(model=ck["model"][:1]), "'model' must be [image-encoder state, text-encoder state]"),
])
def test_bad_checkpoint_is_named_and_writes_nothing(tmp_path, edit, message):
    path = _bad(tmp_path, edit)
    with pytest.raises(ReleasedCheckpointError) as e:
        import_run("pfan", [path], "f30k_precomp", tmp_path / "run")
    assert str(path) in str(e.value) and message in str(e.value), str(e.value)
    assert not (tmp_path / "run").exists()


class _Evil:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/itmatch_released_pwned"),))


def test_code_in_a_checkpoint_is_not_run(tmp_path):
    marker = Path("/tmp/itmatch_released_pwned")
    marker.unlink(missing_ok=True)
    ck = read_released(FIX / "scan_t2i_model_best.pth.tar")
    ck["evil"] = _Evil()
    path = _resave(tmp_path, ck, pickle_module=pickle)
    with pytest.raises(ReleasedCheckpointError, match="not a readable PyTorch checkpoint"):
        read_released(path)
    assert not marker.exists()


def test_cli(tmp_path, capsys):
    out = tmp_path / "results" / "imported" / "scan_f30k"
    files = [str(FIX / "scan_t2i_model_best.pth.tar"), str(FIX / "scan_i2t_model_best.pth.tar")]
    assert main(["import-checkpoint", "scan", *files, "--dataset", "f30k_precomp", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["fuse"] == ["t2i", "i2t"]
    assert (out / "model.pt").exists() and (out / "import.json").exists()
    # a vocabulary of another size is refused, naming both counts
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps({"idx2word": ["<pad>", "<start>", "<end>", "<unk>", "dog"]}))
    bad = tmp_path / "run2"
    assert main(["import-checkpoint", "scan", files[0], "--dataset", "f30k_precomp", "--out", str(bad),
                 "--vocab", str(vocab)]) == 2
    err = capsys.readouterr().err
    assert "40 word embeddings" in err and "5 words" in err and not bad.exists()
    assert main(["import-checkpoint", "scan", files[0], files[0], "--dataset", "x", "--out", str(bad)]) == 2
    assert "same direction" in capsys.readouterr().err and not bad.exists()
