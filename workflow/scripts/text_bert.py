"""Rule bert_features: captions.parquet + tokens.parquet → bert.h5 (ragged per-word BERT features)."""

from itmatch.text.bert import compute_bert
from itmatch.utils.logs import setup_job_logging

sm = snakemake  # noqa: F821 (injected by Snakemake)
setup_job_logging(sm.log[0])
b = sm.params.bert
compute_bert(sm.input.captions, sm.input.tokens, sm.output.bert, model=sm.params.model,
             batch_size=b["batch_size"], max_length=b["max_length"], device=b["device"], block=b["block"])
