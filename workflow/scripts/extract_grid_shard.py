"""Rule extract_grid_shard: one resumable shard of VGG-19 conv5_4 grid features (BSSAN's W2R input)."""

from itmatch.features.extract import parse_scatteritem
from itmatch.features.grid import GridOptions, extract_grid_shard
from itmatch.utils.logs import setup_job_logging

sm = snakemake  # noqa: F821 (injected by Snakemake)
setup_job_logging(sm.log[0])
shard, n_shards = parse_scatteritem(sm.wildcards.scatteritem)
opts = GridOptions.from_config({**sm.params.grid, "weights": sm.input.weights, "threads": sm.threads})
extract_grid_shard(sm.input.images, sm.input.image_dir, sm.output.shard, shard, n_shards, opts)
