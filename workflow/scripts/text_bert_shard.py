"""Rule bert_features_shard: per-word BERT features of one resumable shard of captions, captions/s recorded."""

from itmatch.text.bert import bert_shard
from itmatch.utils.logs import setup_job_logging
from itmatch.utils.shards import parse_scatteritem

sm = snakemake  # noqa: F821 (injected by Snakemake)
setup_job_logging(sm.log[0])
shard, n_shards = parse_scatteritem(sm.wildcards.scatteritem)
b = sm.params.bert
bert_shard(sm.input.captions, sm.input.tokens, sm.output.shard, shard, n_shards, model=sm.params.model,
           batch_size=b["batch_size"], max_length=b["max_length"], device=b["device"], block=b["block"],
           record_path=sm.output.record)
