"""Rule ingest: Karpathy JSON + images → images.parquet, captions.parquet."""

from itmatch.data.ingest import IngestOptions, ingest
from itmatch.utils.logs import setup_job_logging

sm = snakemake  # noqa: F821 (injected by Snakemake)
setup_job_logging(sm.log[0])
ingest(sm.input.json, sm.input.images, sm.output.images, sm.output.captions,
       IngestOptions.from_config(sm.params.options), processes=sm.threads, bad_images=sm.params.bad_images)
