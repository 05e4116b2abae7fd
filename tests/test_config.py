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


def test_unknown_dataset_names_allowed_values(config):
    bad = copy.deepcopy(config)
    bad["datasets"]["mnist"] = bad["datasets"]["f30k"]
    with pytest.raises(ConfigError, match=r"datasets\.mnist: unknown; allowed keys here: coco, f30k, shapes"):
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
