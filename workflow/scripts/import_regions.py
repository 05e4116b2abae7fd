"""Rule import_regions: existing features (bottom-up TSV, npz, SCAN npy) → regions.h5 + regions.parquet."""

from itmatch.features.importers import run_import
from itmatch.utils.logs import setup_job_logging

sm = snakemake  # noqa: F821 (injected by Snakemake)
setup_job_logging(sm.log[0])
run_import(sm.params.spec, sm.input.images, sm.output.h5, sm.output.parquet)
