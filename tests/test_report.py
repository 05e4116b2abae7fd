"""Report: published numbers, results table, figures (real PNGs), README splice, the report rules."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from itmatch.report.figures import plot_recalls, plot_training_curves, read_train_log
from itmatch.report.published import PUBLISHED_PATH, load_published, published_rsum
from itmatch.report.readme import END, START, splice
from itmatch.report.table import read_metrics, results_frame, to_markdown, train_minutes
from tests.conftest import REPO, run_snakemake

MODELS = ["scan", "pfan", "caan", "smfea", "glfn", "bssan"]
REPORT_RULES = ["results_table", "training_curves", "recall_plot", "pfan_figure6", "report_all"]


def fake_run(root: Path, model: str, dataset: str, seed: int, protocols=("1k",)) -> Path:
    """A metrics.json (docs/contract.md layout) and a train_log.csv for one (model, dataset)."""
    rng = np.random.default_rng(seed)
    d = root / "results" / model / dataset
    d.mkdir(parents=True, exist_ok=True)
    protos = {}
    for p in protocols:
        sides = {s: dict(zip(["r1", "r5", "r10"], np.sort(rng.uniform(10, 95, 3)).round(1).tolist(), strict=True))
                 | {"medr": 2.0, "meanr": 6.5} for s in ("i2t", "t2i")}
        protos[p] = sides | {"rsum": round(sum(sides[s][k] for s in sides for k in ("r1", "r5", "r10")), 1),
                             "folds": 1}
    (d / "metrics.json").write_text(json.dumps({"model": model, "dataset": dataset, "protocols": protos,
                                                "n_images": 20, "n_captions": 100, "seconds": 90.0}))
    with open(d / "train_log.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["epoch", "step", "loss", "val_i2t_r1", "val_t2i_r1", "rsum", "lr", "seconds"])
        for e in range(4):
            w.writerow([e, 10 * (e + 1), 4.0 - 0.7 * e, 10 * e, 8 * e, 60 + 35 * e + seed, 2e-4, 1.5 * e])
    return d / "metrics.json"


def assert_real_png(path: Path, min_size=(300, 200)) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as im:
        assert im.size[0] >= min_size[0] and im.size[1] >= min_size[1]
        px = np.asarray(im.convert("L"))
    assert px.std() > 5, f"{path} looks blank"


def test_published_numbers_have_sources_and_match_the_papers_readme():
    pub = load_published()
    assert {key for key in pub if "/" not in key} == set(MODELS)   # + the papers' ablation rows, "model/variant"
    assert {key.split("/")[0] for key in pub} == set(MODELS)
    for model, per_ds in pub.items():
        for ds, per_proto in per_ds.items():
            for proto, row in per_proto.items():
                assert "Table" in row["source"], (model, ds, proto)
    # Headline numbers of /work/shared/papers/README.md (i2t R@1 / t2i R@1).
    assert (pub["pfan"]["f30k"]["1k"]["i2t"]["r1"], pub["pfan"]["f30k"]["1k"]["t2i"]["r1"]) == (70.0, 50.4)
    assert (pub["pfan"]["coco"]["1k"]["i2t"]["r1"], pub["pfan"]["coco"]["1k"]["t2i"]["r1"]) == (76.5, 61.6)
    assert (pub["caan"]["coco"]["5k"]["i2t"]["r1"], pub["caan"]["coco"]["5k"]["t2i"]["r1"]) == (52.5, 41.2)
    # SMFEA with its CAC branch (issue 17): the full model's rows, Tables 1–3 (the README's headline numbers).
    assert (pub["smfea"]["f30k"]["1k"]["i2t"]["r1"], pub["smfea"]["f30k"]["1k"]["t2i"]["r1"]) == (73.7, 54.7)
    assert published_rsum(pub["smfea"]["f30k"]["1k"]) == 487.5 and "Table 1" in pub["smfea"]["f30k"]["1k"]["source"]
    assert (pub["smfea"]["coco"]["1k"]["i2t"]["r1"], pub["smfea"]["coco"]["1k"]["t2i"]["r1"]) == (75.1, 62.5)
    assert (pub["smfea"]["coco"]["5k"]["i2t"]["r1"], pub["smfea"]["coco"]["5k"]["t2i"]["r1"]) == (54.2, 41.9)
    # SCAN COCO 5K: the same kind of model as ours (the t-i LSE + i-t AVG ensemble), rSum as printed.
    assert published_rsum(pub["scan"]["coco"]["5k"]) == 410.9 and "ensemble" in pub["scan"]["coco"]["5k"]["source"]
    assert (pub["glfn"]["coco"]["1k"]["i2t"]["r1"], pub["glfn"]["coco"]["1k"]["t2i"]["r1"]) == (78.4, 62.6)
    assert (pub["bssan"]["f30k"]["1k"]["i2t"]["r1"], pub["bssan"]["f30k"]["1k"]["t2i"]["r1"]) == (44.6, 33.2)
    # rSum is the six recalls' sum where the paper prints none.
    assert published_rsum(pub["pfan"]["f30k"]["1k"]) == pytest.approx(70.0 + 91.8 + 95.0 + 50.4 + 78.7 + 86.1)


def test_published_file_errors_name_the_entry(tmp_path):
    data = yaml.safe_load(PUBLISHED_PATH.read_text())
    data["pfan"]["f30k"]["1k"]["i2t"]["r5"] = 191.8
    bad = tmp_path / "p.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=r"pfan\.f30k\.1k\.i2t\.r5"):
        load_published(bad)
    del data["pfan"]
    data["vse"] = {}
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match="unknown model 'vse'"):
        load_published(bad)


def test_results_table_puts_ours_next_to_the_paper(tmp_path):
    files = [fake_run(tmp_path, "pfan", "f30k", 1), fake_run(tmp_path, "scan", "shapes", 2),
             fake_run(tmp_path, "caan", "coco", 3, protocols=("1k", "5k"))]
    df = results_frame(files, load_published())
    key = list(zip(df.model, df.dataset, df.protocol, df.source == "ours", strict=True))
    assert key == [("pfan", "f30k", "1k", True), ("pfan", "f30k", "1k", False), ("scan", "shapes", "1k", True),
                   ("caan", "coco", "1k", True), ("caan", "coco", "1k", False),
                   ("caan", "coco", "5k", True), ("caan", "coco", "5k", False)]
    ours = json.loads(files[0].read_text())["protocols"]["1k"]
    assert df.iloc[0]["i2t_r1"] == ours["i2t"]["r1"] and df.iloc[0]["rsum"] == ours["rsum"]
    assert df.iloc[1]["i2t_r1"] == 70.0 and "Table 1" in df.iloc[1]["source"]
    md = to_markdown(df)
    lines = md.strip().splitlines()
    assert len(lines) == 2 + len(df)
    assert "| PFAN | Flickr30K | 1k | *paper: PFAN paper (pfan.txt) Table 1" in md and "*70.0*" in md
    assert f"| {ours['i2t']['r1']:.1f} |" in lines[2]
    # Timing columns: the log's last cumulative seconds (4.5 s) and metrics.json's evaluation seconds (90 s).
    assert df.iloc[0]["train_min"] == pytest.approx(4.5 / 60) and df.iloc[0]["eval_min"] == pytest.approx(1.5)
    assert lines[0].endswith("| rSum | train min | eval min |") and lines[2].endswith("| 0.1 | 1.5 |")
    assert lines[3].endswith("| – | – |")                       # the paper's row has no timings


def test_train_minutes_sums_the_parts_of_a_fused_model(tmp_path):
    log = tmp_path / "train_log.csv"
    log.write_text("part,epoch,seconds\nt2i,0,60\nt2i,1,600\ni2t,0,90\ni2t,1,300\n")
    assert train_minutes(log) == pytest.approx(15.0)           # (600 + 300) s
    log.write_text("epoch,seconds\n0,60\n1,150\n")
    assert train_minutes(log) == pytest.approx(2.5)
    assert train_minutes(tmp_path / "missing.csv") is None


def test_bad_metrics_file_is_named(tmp_path):
    f = tmp_path / "metrics.json"
    f.write_text(json.dumps({"model": "scan", "dataset": "shapes", "protocols": {"1k": {"i2t": {"r1": 1}}}}))
    with pytest.raises(ValueError, match=r"metrics.json: missing protocols\.1k\.i2t\.r5"):
        read_metrics(f)


def test_figures_are_real_pngs(tmp_path):
    files = [fake_run(tmp_path, m, "f30k", i) for i, m in enumerate(["pfan", "caan", "scan"])]
    plot_recalls(files, load_published(), tmp_path / "recall.png", "f30k")
    assert_real_png(tmp_path / "recall.png")
    plot_training_curves(tmp_path / "results/pfan/f30k/train_log.csv", tmp_path / "curves.png", "pfan on f30k")
    assert_real_png(tmp_path / "curves.png")
    with pytest.raises(ValueError, match="no metrics for dataset 'coco'"):
        plot_recalls(files, {}, tmp_path / "x.png", "coco")
    fused = tmp_path / "fused.csv"  # SCAN/PFAN: one log per direction
    fused.write_text("part,epoch,step,loss,rsum\n" + "".join(f"{p},{e},{e * 5},{3 - e},{50 + 20 * e + k}\n"
                                                            for k, p in enumerate(["t2i", "i2t"]) for e in range(3)))
    plot_training_curves(fused, tmp_path / "fused.png", "pfan")
    assert_real_png(tmp_path / "fused.png")
    bad = tmp_path / "log.csv"
    bad.write_text("epoch,lr\n0,0.1\n")
    with pytest.raises(ValueError, match=r"log.csv: missing column\(s\) loss, rsum"):
        read_train_log(bad)


def test_readme_splice_replaces_only_between_markers():
    readme = f"# t\n\nintro\n{START}\nold table\n{END}\n\n## next\n"
    out = splice("| a |\n|---|\n", readme)
    assert out == f"# t\n\nintro\n{START}\n| a |\n|---|\n{END}\n\n## next\n"
    assert splice("| a |\n|---|\n", out) == out
    with pytest.raises(ValueError, match="markers"):
        splice("x", "# no markers\n")


def test_readme_has_the_markers():
    text = (REPO / "README.md").read_text()
    assert text.count(START) == 1 and text.count(END) == 1


def test_report_rules_and_html_report(tmp_path):
    """The report rules on fake runs, then `snakemake --report`: the HTML embeds the figures."""
    for i, m in enumerate(["scan", "pfan"]):
        fake_run(tmp_path, m, "shapes", i)
    allowed = ["--allowed-rules", *REPORT_RULES]
    cfg = ["--config", "report={'models': ['scan', 'pfan'], 'datasets': ['shapes']}"]
    targets = ["results/report/results_table.md", "results/report/results.csv",
               "results/report/curves/scan_shapes.png", "results/report/curves/pfan_shapes.png",
               "results/report/recall_shapes.png"]
    run_snakemake(tmp_path, *targets, *cfg, *allowed)
    for png in ["curves/scan_shapes.png", "curves/pfan_shapes.png", "recall_shapes.png"]:
        assert_real_png(tmp_path / "results/report" / png)
    md = (tmp_path / "results/report/results_table.md").read_text()
    assert md.count("this repository") == 2
    run_snakemake(tmp_path, *targets, *cfg, *allowed, "--report", str(tmp_path / "report.html"))
    html = (tmp_path / "report.html").read_text(errors="replace")
    assert len(html) > 10_000 and "recall_shapes.png" in html and "results.csv" in html


def test_pfan_figure6_attention_and_picture(tmp_path):
    """γ recomputed for the figure is the model's own position attention; the picture is a real PNG."""
    import torch

    from itmatch.models.pfan import PFAN
    from itmatch.report.pfan_figure import draw, pfan_attention, select

    torch.manual_seed(0)
    K, R, L, W = 4, 5, 3, 6
    model = PFAN(vocab_size=20, feature_dim=16, blocks_K=K, block_dim=8, embed_dim=16, word_dim=8).eval()
    index = torch.randint(0, K * K, (1, R, L))
    index[0, 0, 2] = K * K  # one padding cell
    weight = torch.rand(1, R, L)
    weight[0, 0, 2] = 0
    boxes = torch.tensor([[[10.0 * r, 5.0, 10.0 * r + 30, 40.0] for r in range(R)]])
    image = {"features": torch.randn(1, R, 16), "num_regions": torch.tensor([R]), "boxes": boxes,
             "block_index": index, "block_weight": weight}
    caption = {"tokens": torch.randint(4, 20, (1, W)), "lengths": torch.tensor([W])}
    att = pfan_attention(model, image, caption)
    gamma = torch.as_tensor(att["gamma"])
    assert gamma.shape == (R, L) and torch.allclose(gamma.sum(-1), torch.ones(R)) and gamma[0, 2] == 0
    # p_i = Σ_j γ_ij b_pij reproduces the model's PositionAttention output (eq. 7).
    b = model.position.embed(index.clamp(0, K * K))[0]
    p_model = model.position(image["features"], index, weight)[0]
    assert torch.allclose((gamma.unsqueeze(-1) * b).sum(1), p_model, atol=1e-5)
    assert att["alpha"].shape == (W, R) and np.allclose(att["alpha"].sum(1), 1)
    words = [f"w{i}" for i in range(W)]
    picks = select(att, words, n_regions=2, n_blocks=6)
    assert len(picks) == 2 and picks[0]["attention"] >= picks[1]["attention"]
    for p in picks:
        g = [w for _, w in p["blocks"]]
        assert g == sorted(g, reverse=True) and all(c < K * K for c, _ in p["blocks"]) and p["word"] in words
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    img = (np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)
    draw(ax, img, " ".join(words), picks, K)
    fig.savefig(tmp_path / "fig6.png")
    plt.close(fig)
    assert_real_png(tmp_path / "fig6.png", min_size=(300, 300))
