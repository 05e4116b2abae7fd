"""Rule blocks: regions.h5 boxes → blocks.h5 (itmatch.features.blocks)."""

from itmatch.features.blocks import blocks_from_regions
from itmatch.utils.logs import setup_job_logging

sm = snakemake  # noqa: F821 (injected by Snakemake)
setup_job_logging(sm.log[0])
blocks_from_regions(sm.input.regions, sm.output.blocks, K=int(sm.params.K), L=int(sm.params.L))
