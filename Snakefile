# itmatch: image-text matching, from raw images and captions to results/{model}/{dataset}/metrics.json.
# Stages live in workflow/rules/*.smk; the logic in the itmatch package; settings in config/config.yaml.
import os
import sys

from snakemake.utils import min_version

min_version("9.0")
sys.path.insert(0, workflow.basedir)  # the itmatch package, also when it is not pip-installed

configfile: os.path.join(workflow.basedir, "config", "config.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/download.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/grid.smk"
include: "workflow/rules/blocks.smk"
include: "workflow/rules/text.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/report.smk"


localrules:
    all,


rule all:
    """The demo (`snakemake` with no target): PFAN trained and evaluated on the embedded shapes dataset."""
    input:
        "results/pfan/shapes/metrics.json",
    default_target: True
