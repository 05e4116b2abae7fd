# Results table, figures and the HTML report (`snakemake --report report.html report_all`).
# Covers every model in config report.models trained on every dataset in report.datasets; the results table also
# lists their ablation variants (config variants) whose metrics.json exists (report.variants).
from itmatch.report.published import PUBLISHED_PATH
from itmatch.report.targets import report_metrics, report_targets

PUBLISHED = str(PUBLISHED_PATH)


localrules:
    report_all,


rule report_all:
    """Every report artifact: results table, training curves, recall@K plots, PFAN's Figure 6."""
    input:
        report_targets(config),


rule results_table:
    """The results table (Markdown + CSV) of every configured model × dataset (and its variants) next to the papers' numbers."""
    input:
        metrics=report_metrics(config, variants=True),
        published=PUBLISHED,
    output:
        markdown="results/report/results_table.md",
        csv=report(
            "results/report/results.csv",
            caption="../report/results.rst",
            category="1. Results",
        ),
    params:
        code=code_version("report_table.py"),
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    log:
        "logs/report/results_table.log",
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/report_table.py"


rule training_curves:
    """Loss and validation rSum per epoch of one run (PNG)."""
    input:
        "results/{model}/{dataset}/train_log.csv",
    output:
        report(
            "results/report/curves/{model}_{dataset}.png",
            caption="../report/curves.rst",
            category="2. Training curves",
            subcategory="{dataset}",
            labels={"model": "{model}", "dataset": "{dataset}"},
        ),
    params:
        title=lambda wc: f"{wc.model} on {wc.dataset}",
        code=code_version("report_curves.py"),
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    log:
        "logs/report/curves_{model}_{dataset}.log",
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/report_curves.py"


rule recall_plot:
    """Recall@K of every model on one dataset next to the published numbers (PNG)."""
    input:
        metrics=lambda wc: report_metrics(config, wc.dataset),
        published=PUBLISHED,
    output:
        report(
            "results/report/recall_{dataset}.png",
            caption="../report/recall.rst",
            category="3. Recall@K",
            labels={"dataset": "{dataset}"},
        ),
    params:
        code=code_version("report_recall.py"),
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    log:
        "logs/report/recall_{dataset}.log",
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/report_recall.py"


rule pfan_figure6:
    """PFAN's Figure 6: position attention over the block grid for a few test images (PNG)."""
    input:
        checkpoint="results/pfan/{dataset}/model.pt",
        images="results/data/{dataset}/images.parquet",
        captions="results/data/{dataset}/captions.parquet",
        tokens="results/text/{dataset}/tokens.parquet",
        vocab="results/text/{dataset}/vocab.json",
        regions="results/features/{dataset}/regions.h5",
        blocks="results/features/{dataset}/blocks.h5",
        image_dir=lambda wc: dataset_cfg(wc.dataset)["images"],
    output:
        report(
            "results/report/pfan_figure6_{dataset}.png",
            caption="../report/pfan_figure6.rst",
            category="4. PFAN attention",
            labels={"dataset": "{dataset}"},
        ),
    params:
        figure=config["report"]["figure6"],
        model_cfg=lambda wc: model_settings(config, "pfan", wc.dataset),
        code=code_version("report_pfan_figure.py", "itmatch.models.pfan"),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=15,
    log:
        "logs/report/pfan_figure6_{dataset}.log",
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/report_pfan_figure.py"
