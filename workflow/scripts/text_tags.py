"""Rule tag_vectors: images.parquet + regions.parquet (+ regions.h5 for R) → tags.h5."""

from itmatch.text.tags import make_tags
from itmatch.utils.logs import setup_job_logging

sm = snakemake  # noqa: F821 (injected by Snakemake)
setup_job_logging(sm.log[0])
make_tags(sm.input.images, sm.input.regions, sm.output.tags, model=sm.params.model,
          regions_h5=sm.input.regions_h5, batch_size=sm.params.bert["batch_size"],
          device=sm.params.bert["device"])
