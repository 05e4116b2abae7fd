# Region features: detector training on shapes, bottom-up extraction (sharded), feature import.

include: "features_functions.smk"


# ---- Region extraction (sharded, resumable) and feature import -------------------------------------------
# Datasets listed under extraction.import.<dataset> are imported from existing features; the others are
# extracted with detector.checkpoints.<dataset>. Shard count: extraction.shards or --set-scatter extract=N.

scattergather:
    extract=config["extraction"]["shards"],

_EXTRACTED = _datasets_where(lambda d: not _import_spec(d))
_IMPORTED = _datasets_where(lambda d: bool(_import_spec(d)))
_PFAN_IMPORTED = _datasets_where(_pfan_imported)


rule extract_regions_shard:
    """Bottom-up region extraction (36 or 10–100 regions per image) over one contiguous shard of images.parquet; resumable."""
    input:
        images="results/data/{dataset}/images.parquet",
        image_dir=lambda wc: dataset_cfg(wc.dataset)["images"],
        detector=lambda wc: _detector_checkpoint(wc.dataset),
    output:
        shard=_shard_output("results/features/{dataset}/shards/{scatteritem}.h5"),
    params:
        detector=lambda wc: _detector_cfg(wc.dataset),
        extraction={k: config["extraction"][k] for k in ("device", "workers")},  # (threads: the rule's)
        code=code_version("extract_regions_shard.py"),
    wildcard_constraints:
        dataset=_EXTRACTED,
        scatteritem=r"\d+-of-\d+",
    threads: config["extraction"]["threads"]
    resources:
        mem_mb=config["extraction"]["mem_mb"],
        runtime=config["extraction"]["runtime"],
        **gpu_resources(config["extraction"]),
    log:
        "logs/extract_regions/{dataset}.{scatteritem}.log",
    conda:
        "../../envs/features.yaml"
    script:
        "../scripts/extract_regions_shard.py"


rule gather_regions:
    """Concatenate the extraction shards into regions.h5 + regions.parquet."""
    input:
        shards=gather.extract("results/features/{{dataset}}/shards/{scatteritem}.h5"),
        images="results/data/{dataset}/images.parquet",
    output:
        h5="results/features/{dataset}/regions.h5",
        parquet="results/features/{dataset}/regions.parquet",
    params:
        block=config["extraction"]["gather_block"],
        code=code_version("extract_gather.py"),
    wildcard_constraints:
        dataset=_EXTRACTED,
    threads: 1
    resources:
        mem_mb=2000,
        runtime=120,
    log:
        "logs/gather_regions/{dataset}.log",
    conda:
        "../../envs/features.yaml"
    script:
        "../scripts/extract_gather.py"


rule import_regions:
    """Import precomputed region features (bottom-up TSV, per-image .npz, SCAN .npy) into regions.h5 instead of extracting."""
    input:
        images="results/data/{dataset}/images.parquet",
        sources=lambda wc: _import_sources(wc.dataset),
    output:
        h5="results/features/{dataset}/regions.h5",
        parquet="results/features/{dataset}/regions.parquet",
    params:
        spec=lambda wc: _import_spec(wc.dataset),
        code=code_version("import_regions.py"),
    wildcard_constraints:
        dataset=_IMPORTED,
    threads: 1
    resources:
        mem_mb=4000,
        runtime=240,
    log:
        "logs/import_regions/{dataset}.log",
    conda:
        "../../envs/features.yaml"
    script:
        "../scripts/import_regions.py"


# PFAN's released *_boxes.npy hold block indices + weights: imported straight into blocks.h5 (instead of the
# block index computed from boxes, which SCAN-imported features do not have).
rule import_pfan_blocks:
    """Import PFAN's released *_boxes.npy position files into blocks.h5, re-aligned by image id."""
    input:
        images="results/data/{dataset}/images.parquet",
        sources=lambda wc: _import_sources(wc.dataset, "pfan"),
    output:
        blocks="results/features/{dataset}/blocks.h5",
    params:
        spec=lambda wc: _import_spec(wc.dataset),
        K=config["blocks"]["K"],
        code=code_version("import_pfan_blocks.py"),
    wildcard_constraints:
        dataset=_PFAN_IMPORTED,
    threads: 1
    resources:
        mem_mb=8000,
        runtime=120,
    log:
        "logs/import_pfan_blocks/{dataset}.log",
    conda:
        "../../envs/features.yaml"
    script:
        "../scripts/import_pfan_blocks.py"


# ---- Demo detector: trained on the boxes, categories and attributes of `shapes` ---------------------------
# Resumable: each epoch's state goes to results/detector/{dataset}/train_state.pt (written atomically); a re-run
# after an interruption continues from the last finished epoch. metrics.json: object/attribute mAP on val
# (pycocotools: AP@0.5 and AP@[.5:.95]).


rule train_detector:
    """Train the demo bottom-up detector on a dataset with box annotations (shapes); writes model.pt + val mAP."""
    input:
        json=lambda wc: dataset_cfg(wc.dataset)["json"],
        images=lambda wc: dataset_cfg(wc.dataset)["images"],
        table="results/data/{dataset}/images.parquet",
    output:
        model="results/detector/{dataset}/model.pt",
        metrics="results/detector/{dataset}/metrics.json",
    params:
        detector=lambda wc: _detector_cfg(wc.dataset),  # detector section + per_dataset overrides
        code=code_version("train_detector.py"),
    wildcard_constraints:
        dataset="shapes",
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
        **gpu_resources(lambda wc: _detector_cfg(wc.dataset)["training"]),
    log:
        "logs/train_detector/{dataset}.log",
    conda:
        "../../envs/features.yaml"
    script:
        "../scripts/train_detector.py"
