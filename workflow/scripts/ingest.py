"""Rule ingest: a dataset's inputs (by its kind) → images.parquet, captions.parquet.

shapes / karpathy: Karpathy JSON + images; captions: image folder + captions table; images: image folder only;
precomp: SCAN's precomputed folder (captions and .npy headers; the arrays are imported by rule import_regions).
"""

from itmatch.data.folders import SplitRatio, ingest_captions, ingest_images
from itmatch.data.ingest import IngestOptions, ingest
from itmatch.data.precomp import ingest_precomp_folder
from itmatch.utils.logs import setup_job_logging

sm = snakemake  # noqa: F821 (injected by Snakemake)
setup_job_logging(sm.log[0])
options = IngestOptions.from_config(sm.params.options)
kind = sm.params.dataset["kind"]
if kind == "captions":
    ingest_captions(sm.input.captions, sm.input.images, sm.output.images, sm.output.captions, options,
                    SplitRatio.from_config(sm.params.dataset["split"]), processes=sm.threads)
elif kind == "precomp":
    p = sm.params.dataset
    ingest_precomp_folder(p["folder"], p["splits"], p["boxes"], sm.output.images, sm.output.captions,
                          key=f"datasets.{sm.wildcards.dataset}")
elif kind == "images":
    ingest_images(sm.input.images, sm.output.images, sm.output.captions, options,
                  files=sm.input.get("files"), processes=sm.threads)
else:
    ingest(sm.input.json, sm.input.images, sm.output.images, sm.output.captions, options, processes=sm.threads,
           bad_images=sm.params.bad_images)
