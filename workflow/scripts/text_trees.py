"""Rule referral_trees: parse shards → trees + dictionaries → trees.parquet + tree_vocab.json."""

from itmatch.text.trees import gather_trees
from itmatch.utils.logs import setup_job_logging
from itmatch.utils.shards import log_shard_records

sm = snakemake  # noqa: F821 (injected by Snakemake)
setup_job_logging(sm.log[0])
log_shard_records(sm.input.records)
gather_trees(list(sm.input.shards), sm.input.captions, sm.output.trees, sm.output.vocab, parser=sm.params.parser,
             **sm.params.dictionaries)
