"""Rule download_{dataset}: fetch / extract / check a real dataset (coco, f30k) as its config says."""

from itmatch.data.acquire import acquire
from itmatch.utils.logs import setup_job_logging

sm = snakemake  # noqa: F821 (injected by Snakemake)
setup_job_logging(sm.log[0])
acquire(sm.params.dataset, sm.params.download, sm.output.json, sm.output.images, sm.output.verified,
        sm.params.report, on_bad_image=sm.params.on_bad_image, processes=sm.threads)
