"""Rule generate_shapes: write the embedded synthetic dataset (images + Karpathy JSON)."""

from itmatch.data.shapes import ShapesSpec, generate
from itmatch.utils.logs import setup_job_logging

sm = snakemake  # noqa: F821 (injected by Snakemake)
setup_job_logging(sm.log[0])
generate(ShapesSpec.from_config(sm.params.generator), sm.output.json, sm.output.images, processes=sm.threads)
