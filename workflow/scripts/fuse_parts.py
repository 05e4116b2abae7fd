"""Rule fuse_parts: separately trained directions (t2i, i2t) → one checkpoint + one train_log.csv."""

from itmatch.training.loop import fuse_checkpoints
from itmatch.utils.logs import setup_job_logging

sm = snakemake  # noqa: F821 (injected by Snakemake)
setup_job_logging(sm.log[0])
fuse_checkpoints(sm.wildcards.model, list(sm.input.models), list(sm.input.logs), list(sm.params.parts),
                 sm.output.model, sm.output.log)
