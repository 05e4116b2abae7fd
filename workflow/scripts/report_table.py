"""Rule results_table: metrics.json files + published.yaml → results_table.md (README) and results.csv."""

from itmatch.report.published import load_published
from itmatch.report.table import results_frame, to_markdown
from itmatch.utils.io import atomic_path
from itmatch.utils.logs import log, setup_job_logging

sm = snakemake  # noqa: F821 (injected by Snakemake)
setup_job_logging(sm.log[0])
df = results_frame(list(sm.input.metrics), load_published(sm.input.published))
with atomic_path(sm.output.csv) as tmp:
    df.to_csv(tmp, index=False, float_format="%.1f")
with atomic_path(sm.output.markdown) as tmp:
    tmp.write_text(to_markdown(df), encoding="utf-8")
log.info("results table: %d rows from %d metrics files", len(df), len(sm.input.metrics))
