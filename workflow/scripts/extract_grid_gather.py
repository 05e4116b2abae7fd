"""Rule gather_grid: grid shards → grid.h5, streaming."""

from itmatch.features.grid import gather_grid
from itmatch.utils.logs import setup_job_logging

sm = snakemake  # noqa: F821 (injected by Snakemake)
setup_job_logging(sm.log[0])
gather_grid(list(sm.input.shards), sm.input.images, sm.output.h5, block=sm.params.block)
