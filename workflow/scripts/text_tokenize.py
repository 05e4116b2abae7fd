"""Rule tokenize: captions.parquet → vocab.json + tokens.parquet."""

from itmatch.text.vocab import make_tokens
from itmatch.utils.logs import setup_job_logging

sm = snakemake  # noqa: F821 (injected by Snakemake)
setup_job_logging(sm.log[0])
vocab = {k: v for k, v in dict(sm.params.vocab).items() if k != "punkt"}  # (punkt: a rerun trigger only)
make_tokens(sm.input.captions, sm.output.vocab, sm.output.tokens, min_count=sm.params.min_count, **vocab)
