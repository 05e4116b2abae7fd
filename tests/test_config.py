"""Config validation: the shipped config is valid; bad configs fail naming the key and allowed values."""

from __future__ import annotations

import copy

import pytest
import yaml

from itmatch.config import ConfigError, load_config, validate_config
from tests.conftest import REPO, TEST_CONFIG, run_snakemake


@pytest.fixture()
def config() -> dict:
    with open(REPO / "config" / "config.yaml") as fh:
        return yaml.safe_load(fh)


def test_shipped_and_test_configs_are_valid():
    cfg = load_config(REPO / "config" / "config.yaml", [TEST_CONFIG])
    assert cfg["datasets"]["shapes"]["generator"]["n_train"] == 60


def test_a_new_dataset_name_needs_a_kind(config):
    """Any name under datasets declares a dataset (tests/test_user_datasets.py); one of your own names its kind."""
    bad = copy.deepcopy(config)
    bad["datasets"]["mnist"] = copy.deepcopy(bad["datasets"]["f30k"])
    with pytest.raises(ConfigError, match=r"config key datasets\.mnist\.kind: required but missing"):
        validate_config(bad)
    bad["datasets"]["mnist"]["kind"] = "karpathy"
    validate_config(bad)


def test_wrong_type_names_key(config):
    bad = copy.deepcopy(config)
    bad["datasets"]["shapes"]["generator"]["n_train"] = "many"
    with pytest.raises(ConfigError, match=r"datasets\.shapes\.generator\.n_train: expected integer, got str"):
        validate_config(bad)


def test_missing_required_key(config):
    bad = copy.deepcopy(config)
    del bad["datasets"]["shapes"]["generator"]["seed"]
    with pytest.raises(ConfigError, match=r"datasets\.shapes\.generator\.seed: required but missing"):
        validate_config(bad)


def test_enum_lists_allowed_values(config):
    bad = copy.deepcopy(config)
    bad["ingest"]["on_bad_image"] = "ignore"
    msg = r"ingest\.on_bad_image: 'ignore' is not allowed; allowed values: error, drop"
    with pytest.raises(ConfigError, match=msg):
        validate_config(bad)


def test_unknown_top_level_key(config):
    bad = copy.deepcopy(config)
    bad["trainnig"] = {}
    with pytest.raises(ConfigError, match=r"config key trainnig: unknown"):
        validate_config(bad)


def test_snakemake_stops_before_any_job(tmp_path):
    proc = run_snakemake(tmp_path, "-n", "results/data/shapes/captions.parquet", "--config",
                         "ingest={'on_bad_image': 'ignore'}", check=False)
    assert proc.returncode != 0
    assert "ingest.on_bad_image: 'ignore' is not allowed; allowed values: error, drop" in proc.stderr + proc.stdout
    assert not (tmp_path / "resources").exists()


def _set(cfg: dict, dotted: str, value) -> dict:
    node = cfg
    *parents, last = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return cfg


# issue 21 item 6: each case is refused, naming the key
GAPS = [
    ("blocks.k", 4, r"config key blocks\.k: unknown; allowed keys here: K, L"),
    ("datasets.shapes.sorce", "local", r"config key datasets\.shapes\.sorce: unknown; allowed keys here: download, "
                                        r"generator, images, ingest, json, kind, source"),
    ("datasets.shapes.generatr", {}, r"config key datasets\.shapes\.generatr: unknown"),
    ("datasets.coco.jsonn", "x.json", r"config key datasets\.coco\.jsonn: unknown"),
    ("models.caan.datasets.shapes.embd_dim", 32, r"config key models\.caan\.datasets\.shapes\.embd_dim: unknown; "
                                                  r"allowed keys here: attn_dim, checkpoint, embed_dim"),
    ("models.glfn.datasets.coco.alhpa", 0.5, r"config key models\.glfn\.datasets\.coco\.alhpa: unknown"),
    ("models.scan.datasets.shapes.training", {"lr": 1.0}, r"models\.scan\.datasets\.shapes\.training: unknown"),
    # one spelling of a model's training overrides: training.models.<model>, not models.<model>.training
    ("models.pfan.training", {"lr": 1.0}, r"config key models\.pfan\.training: unknown"),
    ("detector.per_dataset.shapes.input.fromat", "RGB", r"config key detector\.per_dataset\.shapes\.input\.fromat: "
                                                         r"unknown; allowed keys here: format, pixel_mean, pixel_std"),
    ("text.trees.parser.shapez", "gold", r"config key text\.trees\.parser\.shapez: unknown; allowed keys here: "
                                         r"coco, f30k, shapes"),
    ("text.bert.dataset_model.shapez", "x", r"config key text\.bert\.dataset_model\.shapez: unknown"),
    ("evaluation.split", "tset", r"config key evaluation\.split: 'tset' is not allowed; allowed values: test, val, "
                                 r"train"),
    ("evaluation.datasets.shapes.split", "tset", r"evaluation\.datasets\.shapes\.split: 'tset' is not allowed"),
    ("datasets.shapes.source", "download", r"datasets\.shapes\.source: 'download' is not allowed; allowed values: "
                                           r"generate, local"),
    ("datasets.shapes.generator.min_objects", 5, r"config key datasets\.shapes\.generator\.min_objects: 5 is more "
                                                 r"than max_objects 4"),
    ("detector.inference.min_regions", 500, r"config key detector\.inference\.min_regions: 500 is more than "
                                            r"detector\.inference\.max_regions 100"),
    ("detector.per_dataset.shapes.inference.min_size", 200,
     r"config key detector\.per_dataset\.shapes\.inference\.min_size: 200 is more than "
     r"detector\.per_dataset\.shapes\.inference\.max_size 128"),
    ("detector.per_dataset.coco.inference.max_size", 300,
     r"config key detector\.inference\.min_size: 600 is more than detector\.per_dataset\.coco\.inference\.max_size "
     r"300"),
]


@pytest.mark.parametrize(("key", "value", "message"), GAPS, ids=[g[0] for g in GAPS])
def test_validation_gaps_are_refused(config, key, value, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(_set(copy.deepcopy(config), key, value))


def test_per_dataset_model_overrides_list_the_model_keys():
    """models.<m>.datasets.<ds> accepts exactly the keys of models.<m> (no defaults there: Snakemake would
    fill them in and override the model-level values)."""
    from itmatch.config import load_schema

    schema = load_schema()
    models = schema["properties"]["models"]["properties"]
    for name in ("caan", "bssan", "smfea", "glfn"):
        keys = schema["$defs"][f"{name}_keys"]["properties"]
        assert set(keys) == set(models[name]["properties"]) - {"datasets"}, name
        assert not any("default" in v for v in keys.values()), name
    scan_keys = schema["$defs"]["scan_model_keys"]["properties"]
    assert set(scan_keys) == set(schema["$defs"]["scan_model"]["properties"]) - {"datasets", "training"}


def test_string_numbers_become_numbers_only_where_the_schema_wants_them(config):
    cfg = copy.deepcopy(config)
    _set(cfg, "training.lr", "3e-4")
    _set(cfg, "training.epochs", "4")
    _set(cfg, "training.max_violation", "false")
    _set(cfg, "detector.architecture.depth", "101")
    _set(cfg, "datasets.coco.json", "123")  # a string key stays a string
    validate_config(cfg)
    assert (cfg["training"]["lr"], cfg["training"]["epochs"], cfg["training"]["max_violation"]) == (3e-4, 4, False)
    assert cfg["detector"]["architecture"]["depth"] == 101 and cfg["datasets"]["coco"]["json"] == "123"
    _set(cfg, "training.epochs", "four")
    with pytest.raises(ConfigError, match=r"config key training\.epochs: expected integer, got str \('four'\)"):
        validate_config(cfg)


def test_nested_config_override_is_typed_and_typos_stop_snakemake(tmp_path):
    """--config with a nested value: numbers arrive as strings from Snakemake and are read as numbers; a nested
    typo stops the run before any job."""
    ok = run_snakemake(tmp_path, "-n", "results/data/shapes/captions.parquet", "--config",
                       "datasets={'shapes': {'generator': {'n_train': '61'}}}")
    assert "generate_shapes" in ok.stdout
    proc = run_snakemake(tmp_path, "-n", "results/data/shapes/captions.parquet", "--config",
                         "blocks={'k': 4}", check=False)
    assert proc.returncode != 0
    assert "config key blocks.k: unknown; allowed keys here: K, L" in proc.stderr + proc.stdout
    assert not (tmp_path / "resources").exists()
