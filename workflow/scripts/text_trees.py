"""Rule referral_trees: captions.parquet + parses (gold JSON or stanza) → trees.parquet + tree_vocab.json."""

from itmatch.text.trees import make_trees
from itmatch.utils.logs import setup_job_logging

sm = snakemake  # noqa: F821 (injected by Snakemake)
setup_job_logging(sm.log[0])
t = sm.params.trees
make_trees(sm.input.captions, sm.output.trees, sm.output.vocab, parser=sm.params.parser,
           json_path=sm.input.parses if sm.params.parser == "gold" else None,
           stanza_dir=t["stanza_dir"], stanza_batch_size=t["stanza_batch_size"], device=t["device"],
           entity_min_count=t["entity_min_count"], relation_min_count=t["relation_min_count"],
           max_entities=t["max_entities"], max_relations=t["max_relations"])
