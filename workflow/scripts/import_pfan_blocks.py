"""Rule import_pfan_blocks: PFAN's released *_boxes.npy (block indices + weights) → blocks.h5."""

from itmatch.features.importers import import_pfan_boxes
from itmatch.utils.logs import setup_job_logging

sm = snakemake  # noqa: F821 (injected by Snakemake)
setup_job_logging(sm.log[0])
spec = sm.params.spec
import_pfan_boxes(spec["pfan_boxes"], sm.input.images, sm.output.blocks, K=sm.params.K,
                  id_field=spec.get("id_field", "auto"))
