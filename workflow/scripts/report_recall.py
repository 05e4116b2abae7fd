"""Rule recall_plot: the dataset's metrics.json files + published numbers → recall@K plot (PNG)."""

from itmatch.report.figures import plot_recalls
from itmatch.report.published import load_published
from itmatch.utils.logs import setup_job_logging

sm = snakemake  # noqa: F821 (injected by Snakemake)
setup_job_logging(sm.log[0])
plot_recalls(list(sm.input.metrics), load_published(sm.input.published), sm.output[0], sm.wildcards.dataset)
