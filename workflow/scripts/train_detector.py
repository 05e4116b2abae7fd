"""Rule train_detector: shapes boxes/categories/attributes → results/detector/{dataset}/model.pt + metrics.json."""

from itmatch.features.detector.train import train_detector
from itmatch.utils.logs import setup_job_logging

sm = snakemake  # noqa: F821 (injected by Snakemake)
setup_job_logging(sm.log[0])
train_detector(sm.input.json, sm.input.images, sm.input.table, sm.output.model, sm.output.metrics,
               sm.params.detector, threads=sm.threads)
