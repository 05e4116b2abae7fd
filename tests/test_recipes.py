"""Recipes: `itmatch recipe` values (the papers'), bad input, sources, docs/recipes.md up to date, and the train
rules' params of a dry run on COCO / Flickr30K layouts equal to `itmatch recipe` for every model."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from itmatch.models.registry import MODELS
from itmatch.recipes import SOURCES, flatten, load_recipe_config, markdown, resolve
from itmatch.training.settings import part_config
from tests.conftest import REPO


def itmatch(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "itmatch.cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def recipe_json(model: str, dataset: str, *extra: str) -> dict:
    return json.loads(itmatch("recipe", model, dataset, *extra).stdout)


def test_pfan_f30k_is_the_released_run_script():
    r = recipe_json("pfan", "f30k")
    assert r["model"]["t2i"]["agg"] == "Mean" and r["model"]["i2t"]["agg"] == "Mean"
    assert r["model"]["t2i"]["lambda_softmax"] == 9.0 and r["model"]["i2t"]["lambda_softmax"] == 4.0
    t = r["training"]
    assert (t["optimizer"], t["lr"], t["epochs"], t["lr_decay_epochs"], t["batch_size"]) == ("adam", 2e-4, 30, 15, 128)
    assert r["model"]["fuse"] == ["t2i", "i2t"] and r["model"]["tokens"]["start_end"] is True
    assert "run_train.sh" in r["sources"]["training.lr"] and "eq. 11" in r["sources"]["model.t2i.agg"]
    coco = recipe_json("pfan", "coco")["training"]
    assert (coco["lr"], coco["epochs"], coco["lr_decay_epochs"]) == (5e-4, 30, 15)


def test_paper_schedules_of_smfea_glfn_bssan_caan():
    smfea = recipe_json("smfea", "f30k")["training"]
    assert (smfea["optimizer"], smfea["lr"], smfea["lr_decay"], smfea["lr_decay_epochs"], smfea["epochs"]) == \
        ("adam", 2e-4, 0.1, 25, 50)
    glfn = recipe_json("glfn", "coco")
    assert (glfn["training"]["optimizer"], glfn["training"]["lr"], glfn["training"]["grad_clip"],
            glfn["training"]["epochs"]) == ("adam", 2e-4, 2.0, 30)
    assert glfn["model"]["fuse"] == ["t2i", "i2t"] and glfn["model"]["alpha"] == 0.5
    bssan = recipe_json("bssan", "f30k")
    t = bssan["training"]
    assert (t["optimizer"], t["lr"], t["momentum"], t["weight_decay"]) == ("sgd", 0.01, 0.9, 0.0)
    m = bssan["model"]
    assert (m["lam"], m["delta"], m["tokens"]["max_words"], m["glove"], m["batch_norm"]) == (0.6, 0.01, 30, None, True)
    assert m["w2r_input"] == "grid" and "conv5_4" in bssan["sources"]["model.w2r_input"]
    assert recipe_json("bssan", "coco")["model"]["w2r_input"] == "grid"
    assert recipe_json("bssan", "shapes")["model"]["w2r_input"] == "regions"
    caan = recipe_json("caan", "coco")["training"]
    assert (caan["optimizer"], caan["lr"], caan["epochs"], caan["lr_decay"], caan["lr_decay_epochs"]) == \
        ("adam", 5e-4, 20, 0.1, 10)
    caan_f = recipe_json("caan", "f30k")["training"]
    assert (caan_f["lr"], caan_f["epochs"], caan_f["lr_decay_epochs"]) == (2e-4, 30, 15)


def test_scan_uses_each_datasets_best_ensemble():
    f30k, coco = recipe_json("scan", "f30k")["model"], recipe_json("scan", "coco")["model"]
    assert (f30k["t2i"]["agg"], f30k["i2t"]["agg"], f30k["i2t"]["lambda_lse"]) == ("Mean", "LogSumExp", 5.0)
    assert (coco["t2i"]["agg"], coco["t2i"]["lambda_lse"], coco["i2t"]["agg"]) == ("LogSumExp", 6.0, "Mean")
    assert "Table 1" in recipe_json("scan", "f30k")["sources"]["model.t2i.agg"]


def test_unknown_model_or_dataset_names_the_valid_ones():
    bad = itmatch("recipe", "vsepp", "coco", check=False)
    assert bad.returncode != 0 and "unknown model 'vsepp'" in bad.stderr
    assert "scan, pfan, caan, smfea, glfn, bssan" in bad.stderr
    bad = itmatch("recipe", "pfan", "flickr", check=False)
    assert bad.returncode != 0 and "unknown dataset 'flickr'" in bad.stderr and "coco, f30k, shapes" in bad.stderr


def test_every_cited_key_exists_in_the_recipe():
    config = load_recipe_config(REPO / "config" / "config.yaml")
    for model, by_dataset in SOURCES.items():
        for dataset in ("coco", "f30k"):
            keys = set(flatten({k: v for k, v in resolve(config, model, dataset).items() if k != "sources"}))
            cited = {**by_dataset.get("*", {}), **by_dataset.get(dataset, {})}
            assert set(cited) <= keys, (model, dataset, sorted(set(cited) - keys))
    assert resolve(config, "pfan", "shapes")["sources"] == {}


def test_docs_recipes_md_is_up_to_date():
    expected = markdown(load_recipe_config(REPO / "config" / "config.yaml"))
    assert (REPO / "docs" / "recipes.md").read_text(encoding="utf-8") == expected, \
        "docs/recipes.md is stale: run `itmatch recipe --markdown > docs/recipes.md`"
    assert itmatch("recipe", "--markdown").stdout == expected
    assert "| `model.t2i.agg` |" in expected and "SCAN paper Table 2" in expected


_DRY_RUN = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, DAGSettings, OutputSettings, ResourceSettings, StorageSettings
    repo, workdir, out, configs, targets = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(","), sys.argv[5:]
    with SnakemakeApi(OutputSettings(quiet={"all"})) as api:
        wf = api.workflow(resource_settings=ResourceSettings(cores=1), storage_settings=StorageSettings(),
                          config_settings=ConfigSettings(configfiles=[Path(c) for c in configs]),
                          snakefile=Path(repo) / "Snakefile", workdir=Path(workdir))
        dag = wf.dag(dag_settings=DAGSettings(targets=set(targets)))
        dag.execute_workflow(executor="dryrun")
        jobs = [{"rule": j.rule.name, "wildcards": dict(j.wildcards.items()), "training": j.params.training,
                 "model_cfg": j.params.model_cfg} for j in wf._workflow.dag.jobs
                if j.rule.name in ("train_part", "train_model")]
    Path(out).write_text(json.dumps(jobs))
''')


def test_train_rule_params_equal_itmatch_recipe(tmp_path):
    """A dry run of every model on placeholder Karpathy-format COCO and Flickr30K layouts (empty JSONs, a
    placeholder detector checkpoint and BERT folder): each train job's params are the `itmatch recipe` output."""
    for d, name in (("coco", "dataset_coco.json"), ("f30k", "dataset_flickr30k.json")):
        (tmp_path / f"resources/{d}/images").mkdir(parents=True)
        (tmp_path / f"resources/{d}/{name}").write_text(json.dumps({"images": []}))
    (tmp_path / "resources/ckpt.pth").touch()
    (tmp_path / "resources/vgg19.pth").touch()
    (tmp_path / "resources/bert").mkdir()
    extra = tmp_path / "extra.yaml"
    extra.write_text("detector:\n  checkpoints:\n    coco: resources/ckpt.pth\n    f30k: resources/ckpt.pth\n"
                     "text:\n  bert:\n    model: resources/bert\ngrid:\n  weights: resources/vgg19.pth\n")
    script = tmp_path / "dry_run_params.py"
    script.write_text(_DRY_RUN)
    targets = [f"results/{m}/{d}/model.pt" for m in MODELS for d in ("coco", "f30k")]
    out = tmp_path / "jobs.json"
    proc = subprocess.run([sys.executable, str(script), str(REPO), str(tmp_path), str(out),
                           f"{REPO / 'config/config.yaml'},{extra}", *targets], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    jobs = json.loads(out.read_text())
    seen = set()
    for job in jobs:
        w = job["wildcards"]
        rec = recipe_json(w["model"], w["dataset"], "--configfile", str(extra))
        assert job["training"] == rec["training"], (w, job["training"], rec["training"])
        assert job["model_cfg"] == part_config(rec["model"], w.get("part")), w
        seen.add((w["model"], w["dataset"], w.get("part")))
    fused = {"scan", "pfan", "glfn"}
    expected = {(m, d, p) for m in MODELS for d in ("coco", "f30k")
                for p in (("t2i", "i2t") if m in fused else (None,))}
    assert seen == expected


@pytest.mark.parametrize("model", ["scan", "glfn"])
def test_recipe_follows_configfile_overrides(tmp_path, model):
    over = tmp_path / "o.yaml"
    over.write_text(f"training:\n  models:\n    {model}:\n      datasets:\n        f30k: {{epochs: 3}}\n")
    assert recipe_json(model, "f30k", "--configfile", str(over))["training"]["epochs"] == 3
    assert recipe_json(model, "coco", "--configfile", str(over))["training"]["epochs"] != 3
