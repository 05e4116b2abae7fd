"""Rule training_curves: train_log.csv → loss and validation rSum per epoch (PNG)."""

from itmatch.report.figures import plot_training_curves
from itmatch.utils.logs import setup_job_logging

sm = snakemake  # noqa: F821 (injected by Snakemake)
setup_job_logging(sm.log[0])
plot_training_curves(sm.input[0], sm.output[0], title=sm.params.title)
