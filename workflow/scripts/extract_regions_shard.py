"""Rule extract_regions_shard: one resumable shard of bottom-up region extraction."""

from itmatch.features.extract import ExtractOptions, extract_shard, parse_scatteritem
from itmatch.utils.logs import setup_job_logging

sm = snakemake  # noqa: F821 (injected by Snakemake)
setup_job_logging(sm.log[0])
shard, n_shards = parse_scatteritem(sm.wildcards.scatteritem)
opts = ExtractOptions.from_config({**sm.params.extraction, "threads": sm.threads}, sm.params.detector)
extract_shard(sm.input.images, sm.input.image_dir, sm.output.shard, shard, n_shards, sm.input.detector,
              sm.params.detector, opts)
