"""Ablation variants (config ``variants``): validation, settings resolution, every predefined variant changes the
model it names, the workflow trains a variant without rerunning what it shares, the report lists variants."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml

from itmatch.config import RUN_FOLDER_ENTRIES, ConfigError, load_schema, validate_config, variant_name_error
from itmatch.models.registry import build_model
from itmatch.recipes import flatten, load_recipe_config, resolve
from itmatch.report.published import load_published
from itmatch.report.table import results_frame, to_markdown
from itmatch.report.targets import report_metrics
from itmatch.training.loss import ContrastiveLoss
from itmatch.training.settings import fused_parts, part_config, recipe
from tests.conftest import REPO, TEST_CONFIG, run_snakemake
from tests.test_report import fake_run
from tests.test_reruns import TRIGGERS, directory_patterns, planned_jobs, snakemake, snapshot


@pytest.fixture()
def config() -> dict:
    with open(REPO / "config" / "config.yaml") as fh:
        return yaml.safe_load(fh)


@pytest.fixture(scope="module")
def resolved() -> dict:
    """The shipped config with the test sizes, validated and completed as the Snakefile does."""
    return load_recipe_config(REPO / "config" / "config.yaml", [TEST_CONFIG])


def with_variant(config: dict, model: str, name, spec: dict) -> dict:
    bad = copy.deepcopy(config)
    bad.setdefault("variants", {}).setdefault(model, {})[name] = spec
    return bad


# ---- validation ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "why"), [
    ("a/b", r"variants\.pfan\.a/b: not a valid variant name: contains '/'"),
    ("metrics.json", r"variants\.pfan\.metrics\.json: not a valid variant name: collides with a run folder's own file"),
    ("model.pt", r"collides with a run folder's own file"),
    ("t2i", r"variants\.pfan\.t2i: not a valid variant name: collides with a run folder's own folder"),
    ("no position", r"use letters, digits, '_' and '-'"),
])
def test_bad_variant_names_are_refused_with_the_reason(config, name, why):
    with pytest.raises(ConfigError, match=why):
        validate_config(with_variant(config, "pfan", name, {"model": {"position": "none"}}))


def test_every_run_folder_entry_is_refused_by_the_schema_and_the_message(config):
    """The schema's variant_name and RUN_FOLDER_ENTRIES agree (a dot-free entry is listed in the schema's enum)."""
    enum = load_schema()["$defs"]["variant_name"]["not"]["enum"]
    for entry in RUN_FOLDER_ENTRIES:
        assert variant_name_error(entry), entry
        assert "." in entry or entry in enum, entry
        with pytest.raises(ConfigError, match="collides with a run folder"):
            validate_config(with_variant(config, "caan", entry, {}))
    assert variant_name_error("no_position") is None and variant_name_error("beta-1") is None


def test_variant_of_an_unknown_model_is_refused(config):
    with pytest.raises(ConfigError, match=r"config key variants\.vse: unknown; allowed keys here: bssan, caan, glfn, "
                                          r"pfan, scan, smfea"):
        validate_config(with_variant(config, "vse", "x", {}))


def test_unknown_setting_keys_are_refused_naming_the_key(config):
    with pytest.raises(ConfigError, match=r"config key variants\.pfan\.x\.model\.positon: unknown; allowed keys "
                                          r"here: .*position, position_bias, position_norm"):
        validate_config(with_variant(config, "pfan", "x", {"model": {"positon": "none"}}))
    with pytest.raises(ConfigError, match=r"variants\.caan\.x\.training\.lrate: unknown"):
        validate_config(with_variant(config, "caan", "x", {"training": {"lrate": 1e-3}}))
    with pytest.raises(ConfigError, match=r"variants\.caan\.x\.training\.datasets\.shapes\.epoch: unknown"):
        validate_config(with_variant(config, "caan", "x", {"training": {"datasets": {"shapes": {"epoch": 1}}}}))
    with pytest.raises(ConfigError, match=r"variants\.caan\.x\.model\.intra_attention: 'xa' is not allowed; "
                                          r"allowed values: none, fa, sa"):
        validate_config(with_variant(config, "caan", "x", {"model": {"intra_attention": "xa"}}))
    with pytest.raises(ConfigError, match=r"variants\.caan\.x\.descripton: unknown"):
        validate_config(with_variant(config, "caan", "x", {"descripton": "typo"}))


def test_variants_that_the_rules_cannot_run_are_refused(config):
    with pytest.raises(ConfigError, match=r"variants\.glfn\.one\.model\.fuse: \[\] switches between one model and "
                                          r"fused directions"):
        validate_config(with_variant(config, "glfn", "one", {"model": {"fuse": []}}))
    validate_config(with_variant(config, "glfn", "t2i_only", {"model": {"fuse": ["t2i"]}}))  # still fused: fine
    with pytest.raises(ConfigError, match=r"variants\.scan\.x\.model\.position: PFAN only"):
        validate_config(with_variant(config, "scan", "x", {"model": {"position": "none"}}))


# ---- resolution ----------------------------------------------------------------------------------------------

def test_variant_settings_merge_over_the_resolved_ones(resolved):
    cfg = with_variant(resolved, "pfan", "short", {
        "model": {"position": "area", "t2i": {"lambda_softmax": 5.0}},
        "training": {"lr": 1e-3, "datasets": {"shapes": {"epochs": 1}, "coco": {"epochs": 7}}}})
    base, var = recipe(cfg, "pfan", "shapes"), recipe(cfg, "pfan", "shapes", "short")
    assert recipe(cfg, "pfan", "shapes", None) == base
    changed = {k for k, v in flatten(var).items() if flatten(base).get(k, "missing") != v}
    assert changed == {"model.position", "model.t2i.lambda_softmax", "training.lr", "training.epochs"}
    # deep merge: the per-dataset sizes (test config) and the other attention keys stay
    assert var["model"]["embed_dim"] == base["model"]["embed_dim"] == 32
    assert var["model"]["t2i"] == {**base["model"]["t2i"], "lambda_softmax": 5.0}
    assert var["training"]["epochs"] == 1 and recipe(cfg, "pfan", "coco", "short")["training"]["epochs"] == 7
    with pytest.raises(ValueError, match=r"unknown variant 'nope' of pfan; defined under config key variants\.pfan: "
                                         r"no_position, short"):
        recipe(cfg, "pfan", "shapes", "nope")


def test_recipe_of_a_variant_names_its_changes_and_source(resolved):
    r = resolve(resolved, "caan", "f30k", "baseline_fa")
    assert r["model"]["inter_attention"] is False and r["model"]["intra_attention"] == "fa"
    assert r["variant"]["changes"] == {"model.inter_attention": False, "model.intra_attention": "fa"}
    assert "Table 4" in r["variant"]["source"] and "baseline+FA" in r["sources"]["model.intra_attention"]
    assert r["sources"]["training.lr"] == resolve(resolved, "caan", "f30k")["sources"]["training.lr"]
    assert "variant" not in resolve(resolved, "caan", "f30k")


def test_recipe_command_prints_a_variant():
    from tests.test_recipes import itmatch, recipe_json

    r = recipe_json("pfan", "shapes", "--variant", "no_position")
    assert r["model"]["position"] == "none" and r["variant"]["changes"] == {"model.position": "none"}
    bad = itmatch("recipe", "pfan", "shapes", "--variant", "nope", check=False)
    assert bad.returncode == 2 and "unknown variant 'nope' of pfan" in bad.stderr and "no_position" in bad.stderr


# ---- every predefined variant changes the model it names ---------------------------------------------------

DATA_INFO = dict(vocab_size=30, feature_dim=12, blocks_K=4, tag_dim=10, bert_dim=14, n_entities=9, n_relations=4,
                 n_objects=5, n_attributes=5, n_concepts=6)


def tiny_batch(B: int = 4, R: int = 5, L: int = 3, W: int = 6) -> tuple[dict, dict]:
    """One aligned batch with every key any model reads (models/base.py layout)."""
    g = torch.Generator().manual_seed(1)
    num = torch.tensor([5, 3, 4, 2])[:B]
    valid = (torch.arange(R)[None] < num[:, None]).float()
    weight = torch.rand(B, R, L, generator=g)
    images = {"features": torch.rand(B, R, 12, generator=g) * valid[..., None], "num_regions": num,
              "boxes": torch.rand(B, R, 4, generator=g) * 50, "image_hw": torch.tensor([[96, 96]] * B),
              "object_id": torch.randint(0, 5, (B, R), generator=g),
              "attribute_id": torch.randint(0, 5, (B, R), generator=g),
              "object_conf": torch.rand(B, R, generator=g) * valid,
              "block_index": torch.randint(0, 16, (B, R, L), generator=g),
              "block_weight": weight / weight.sum(-1, keepdim=True),
              "tag_vectors": torch.randn(B, R, 10, generator=g), "index": torch.arange(B)}
    lens = torch.tensor([6, 4, 3, 5])[:B]
    tokens = torch.randint(1, 30, (B, W), generator=g)
    tokens[torch.arange(W)[None] >= lens[:, None]] = 0
    captions = {"tokens": tokens, "lengths": lens, "bert": torch.randn(B, W, 14, generator=g),
                "tree_labels": torch.tensor([[1, 0, 2, -1, 3, 1, 4]] * B), "image_index": torch.arange(B),
                "index": torch.arange(B)}
    captions["concept_labels"] = (torch.rand(B, 6, generator=g) < 0.4).float()   # SMFEA's CAC branch
    captions["image_concept_labels"] = captions["concept_labels"]
    return images, captions


def behaviour(model_name: str, model_cfg: dict) -> tuple[dict[str, tuple], float, torch.Tensor]:
    """(parameter name → shape, training loss, scores) of the model built from ``model_cfg`` (seeded; a fused
    model's t2i part)."""
    part = fused_parts(model_cfg)[0] if fused_parts(model_cfg) else None
    torch.manual_seed(0)
    model = build_model(model_name, part_config(model_cfg, part), DATA_INFO)
    images, captions = tiny_batch()
    torch.manual_seed(1)
    loss, _ = model.loss(images, captions, ContrastiveLoss(margin=0.2, max_violation=False))
    model.eval()
    with torch.no_grad():
        scores = model.score(model.encode_images(images), model.encode_captions(captions))
    return {n: tuple(p.shape) for n, p in model.state_dict().items()}, float(loss.detach()), scores


def predefined(resolved: dict) -> list[tuple[str, str]]:
    return [(m, v) for m, per_model in resolved["variants"].items() for v in per_model]


def test_the_papers_ablations_are_predefined_with_sources(resolved):
    names = {m: set(v) for m, v in resolved["variants"].items()}
    assert names["pfan"] >= {"no_position"}
    assert names["caan"] == {"baseline", "baseline_ia", "baseline_fa", "baseline_sa", "baseline_ia_fa"}
    assert names["smfea"] >= {"no_trees", "no_kl", "no_ce", "beta_10_00_00", "chain", "linear"}
    assert names["bssan"] >= {"w2r", "o2w", "no_reg"} and names["glfn"] >= {"no_tag", "only_gru", "only_bert"}
    for model, name in predefined(resolved):
        spec = resolved["variants"][model][name]
        assert spec.get("description") and "Table" in spec.get("source", ""), (model, name)
    # each published ablation row belongs to a defined variant
    for key in load_published():
        if "/" in key:
            model, name = key.split("/")
            assert name in names.get(model, set()), key


@pytest.mark.parametrize("model_name", ["pfan", "caan", "smfea", "glfn", "bssan"])
def test_each_predefined_variant_changes_its_keys_and_the_model(resolved, model_name):
    """The resolved settings differ from the base exactly in the variant's keys (at least one), and the model
    built from them differs: other parameters, or (same parameters, same seed) another loss or other scores."""
    base_cfg = recipe(resolved, model_name, "shapes")
    base = behaviour(model_name, base_cfg["model"])
    for name, spec in resolved["variants"][model_name].items():
        var_cfg = recipe(resolved, model_name, "shapes", name)
        intended = {f"model.{k}" for k in flatten(spec.get("model") or {})}
        changed = {k for k, v in flatten(var_cfg).items() if flatten(base_cfg).get(k, "missing") != v}
        assert changed and changed <= intended, (name, changed, intended)
        params, loss, scores = behaviour(model_name, var_cfg["model"])
        assert params != base[0] or loss != pytest.approx(base[1]) or not torch.allclose(scores, base[2]), name


def test_the_model_check_sees_through_a_setting_that_changes_nothing(resolved):
    """The check above is not vacuous: a compute bound (PFAN's max_elems) gives the same parameters, loss, scores."""
    cfg = recipe(resolved, "pfan", "shapes")["model"]
    (p0, l0, s0), (p1, l1, s1) = behaviour("pfan", cfg), behaviour("pfan", {**cfg, "max_elems": 1000})
    assert p0 == p1 and l0 == pytest.approx(l1) and torch.allclose(s0, s1, atol=1e-6)


def test_pfan_without_position_has_no_position_parameters_and_reads_no_blocks(resolved):
    from itmatch.models.registry import model_inputs

    cfg = recipe(resolved, "pfan", "shapes", "no_position")["model"]
    params = behaviour("pfan", cfg)[0]
    assert not [n for n in params if n.startswith("position.")]
    assert params["img_enc.fc.weight"][1] == DATA_INFO["feature_dim"]           # FC(v_i), not FC([v_i, p_i])
    base = behaviour("pfan", recipe(resolved, "pfan", "shapes")["model"])[0]
    assert {"position.embed.weight", "position.M"} <= set(base)
    assert model_inputs("pfan", cfg) == frozenset() and model_inputs("pfan", {}) == {"blocks"}
    area = behaviour("pfan", {**cfg, "position": "area"})[0]                   # embeddings, no attention matrix
    assert "position.embed.weight" in area and "position.M" not in area


def test_pfan_area_position_is_the_overlap_weighted_block_embedding():
    from itmatch.models.pfan import PositionAttention

    torch.manual_seed(0)
    pa = PositionAttention(feature_dim=6, K=3, block_dim=4, attention=False)
    idx = torch.tensor([[[0, 4, 9]]])                                          # 9 = padding (K²)
    w = torch.tensor([[[0.5, 0.25, 0.0]]])
    p = pa(torch.randn(1, 1, 6), idx, w)
    expected = (2 * pa.embed.weight[0] + pa.embed.weight[4]) / 3
    assert torch.allclose(p[0, 0], expected, atol=1e-6)
    with pytest.raises(ValueError, match="models.pfan.position must be one of attention, area, none"):
        build_model("pfan", {"position": "off"}, DATA_INFO)


# ---- the workflow ----------------------------------------------------------------------------------------------

BASE_TARGETS = ["results/pfan/shapes/metrics.json", "results/caan/shapes/metrics.json"]


@pytest.fixture(scope="module")
def base_laid_out(tmp_path_factory) -> Path:
    """A workdir where PFAN's and CAAN's base runs and everything upstream are up to date (placeholders + --touch,
    as tests/test_reruns.py)."""
    root = tmp_path_factory.mktemp("variants")
    snapshot(root / "repo")
    workdir = root / "work"
    workdir.mkdir()
    plan = snakemake(workdir, "-n", *BASE_TARGETS)
    assert plan.returncode == 0, plan.stderr[-3000:]
    jobs = planned_jobs(plan)
    assert {"evaluate", "fuse_parts", "train_part", "train_model"} <= {r for r, _ in jobs}
    assert not [r for r, _ in jobs if "variant" in r]
    dirs = directory_patterns()
    for _, outputs in jobs:
        for o in outputs:
            p = workdir / o
            if any(d.match(o) for d in dirs):
                p.mkdir(parents=True, exist_ok=True)
            else:
                p.parent.mkdir(parents=True, exist_ok=True)
                p.touch()
    touch = snakemake(workdir, *BASE_TARGETS, "--touch", "--forceall")
    assert touch.returncode == 0, touch.stderr[-3000:]
    again = snakemake(workdir, "-n", *BASE_TARGETS, *TRIGGERS)
    assert "Nothing to be done" in again.stdout + again.stderr, again.stdout[-3000:]
    return workdir


def test_fused_variant_schedules_only_its_own_training_and_evaluation(base_laid_out):
    proc = snakemake(base_laid_out, "-n", "results/pfan/shapes/no_position/metrics.json", *TRIGGERS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(planned_jobs(proc))
    run = "results/pfan/shapes/no_position"
    assert jobs == [("evaluate_variant", [f"{run}/metrics.json", f"{run}/sims.h5", f"{run}/ranks.parquet"]),
                    ("fuse_variant_parts", [f"{run}/model.pt", f"{run}/train_log.csv"]),
                    ("train_variant_part", [f"{run}/i2t/model.pt", f"{run}/i2t/train_log.csv"]),
                    ("train_variant_part", [f"{run}/t2i/model.pt", f"{run}/t2i/train_log.csv"])], jobs
    # the variant's settings reach the train jobs (a printed params line is not stable: ask the recipe instead)
    out = proc.stdout + proc.stderr
    assert "logs/train/pfan/shapes/no_position.t2i.log" in out and "logs/evaluate/pfan/shapes/no_position.log" in out


def test_single_model_variant_and_a_variant_defined_in_an_override(base_laid_out):
    proc = snakemake(base_laid_out, "-n", "results/caan/shapes/baseline/metrics.json", *TRIGGERS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(r for r, _ in planned_jobs(proc)) == ["evaluate_variant", "train_variant"]
    mine = {"variants": {"pfan": {"area": {"model": {"position": "area"},
                                           "training": {"datasets": {"shapes": {"epochs": 1}}}}}}}
    proc = snakemake(base_laid_out, "-n", "results/pfan/shapes/area/metrics.json", "results/pfan/shapes/metrics.json",
                     *TRIGGERS, overrides=mine)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outs = {o for _, os_ in planned_jobs(proc) for o in os_}
    assert outs and all(o.startswith("results/pfan/shapes/area/") for o in outs), sorted(outs)


def test_variant_of_another_model_fails_naming_the_defined_ones(base_laid_out):
    proc = snakemake(base_laid_out, "-n", "results/scan/shapes/no_position/metrics.json")
    assert proc.returncode != 0
    assert "unknown variant 'no_position' of scan" in proc.stdout + proc.stderr


# ---- the report ------------------------------------------------------------------------------------------------

def fake_variant(root: Path, model: str, dataset: str, variant: str, seed: int) -> Path:
    base = fake_run(root / "tmp", model, dataset, seed)
    d = root / "results" / model / dataset / variant
    d.mkdir(parents=True, exist_ok=True)
    m = json.loads(base.read_text())
    (d / "metrics.json").write_text(json.dumps({**m, "variant": variant}))
    (d / "train_log.csv").write_text(base.with_name("train_log.csv").read_text())
    return d / "metrics.json"


def test_report_metrics_list_existing_variants_after_their_base(resolved, tmp_path):
    exists = {"results/caan/shapes/baseline_sa/metrics.json"}.__contains__
    files = report_metrics(resolved, "shapes", variants=True, exists=exists)
    i = files.index("results/caan/shapes/metrics.json")
    assert files[i + 1] == "results/caan/shapes/baseline_sa/metrics.json"
    assert report_metrics(resolved, "shapes", exists=exists) == [f for f in files if "baseline_sa" not in f]
    every = report_metrics({**resolved, "report": {**resolved["report"], "variants": "all"}}, "shapes", True)
    assert "results/bssan/shapes/no_reg/metrics.json" in every


def test_results_table_lists_a_variant_beside_its_base_and_the_papers_row(tmp_path):
    files = [fake_run(tmp_path, "caan", "f30k", 1), fake_variant(tmp_path, "caan", "f30k", "baseline_ia", 2)]
    df = results_frame(files, load_published())
    key = list(zip(df.model, df.variant.fillna(""), df.source == "ours", strict=True))
    assert key == [("caan", "", True), ("caan", "", False), ("caan", "baseline_ia", True),
                   ("caan", "baseline_ia", False)]
    assert df.iloc[3]["i2t_r1"] == 60.6 and "baseline+IA" in df.iloc[3]["source"]
    md = to_markdown(df)
    assert "| CAAN (baseline_ia) | Flickr30K | 1k | this repository |" in md
    assert "| CAAN (baseline_ia) | Flickr30K | 1k | *paper: CAAN paper (caan.txt) Table 4, row baseline+IA" in md


def test_results_table_rule_adds_the_existing_variants(tmp_path):
    fake_run(tmp_path, "pfan", "shapes", 0)
    fake_variant(tmp_path, "pfan", "shapes", "no_position", 1)
    run_snakemake(tmp_path, "results/report/results_table.md", "--allowed-rules", "results_table",
                  "--config", "report={'models': ['pfan'], 'datasets': ['shapes']}")
    md = (tmp_path / "results/report/results_table.md").read_text()
    assert md.count("this repository") == 2 and "| PFAN (no_position) | shapes |" in md
