"""Rule gather_regions: extraction shards → regions.h5 + regions.parquet, streaming."""

from itmatch.features.extract import gather_shards
from itmatch.utils.logs import setup_job_logging

sm = snakemake  # noqa: F821 (injected by Snakemake)
setup_job_logging(sm.log[0])
gather_shards(list(sm.input.shards), sm.input.images, sm.output.h5, sm.output.parquet, block=sm.params.block)
