"""Rule bert_features: BERT shards → bert.h5 (ragged per-word BERT features), streaming."""

from itmatch.text.bert import gather_bert
from itmatch.utils.logs import setup_job_logging
from itmatch.utils.shards import log_shard_records

sm = snakemake  # noqa: F821 (injected by Snakemake)
setup_job_logging(sm.log[0])
log_shard_records(sm.input.records)
gather_bert(list(sm.input.shards), sm.input.captions, sm.input.tokens, sm.output.bert)
