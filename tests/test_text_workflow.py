"""The text rules are wired: a dry run on shapes plans tokenize, referral_trees, bert_features.

(tag_vectors needs the region features; tests/test_text_bert.py covers it on small tables.)
"""

from __future__ import annotations

from conftest import run_snakemake

TARGETS = ["results/text/shapes/vocab.json", "results/text/shapes/tokens.parquet",
           "results/text/shapes/trees.parquet", "results/text/shapes/tree_vocab.json",
           "results/text/shapes/bert.h5"]


def test_text_rules_dry_run(tmp_path):
    proc = run_snakemake(tmp_path, "-n", *TARGETS)
    out = proc.stdout + proc.stderr
    for rule in ("tokenize", "referral_trees_shard", "referral_trees", "bert_features_shard", "bert_features"):
        assert f"rule {rule}:" in out, out[-3000:]
    assert "fetch_stanza_models" not in out and "fetch_bert_model" not in out  # shapes needs neither
