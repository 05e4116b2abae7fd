# BSSAN's W2R input: VGG-19 conv5_4 grid features of every image (sharded, resumable) → grid.h5.
# Scheduled only for the datasets whose BSSAN reads it (models.bssan.w2r_input: grid → BSSAN.inputs has "grid").
# Shard count: grid.shards or --set-scatter grid=N; the shard machinery is region extraction's.

include: "grid_functions.smk"


scattergather:
    grid=config["grid"]["shards"],


rule extract_grid_shard:
    """VGG-19 conv5_4 grid features (BSSAN's W2R input, 196 × 512 per image) over one contiguous shard of images.parquet; resumable."""
    input:
        images="results/data/{dataset}/images.parquet",
        image_dir=lambda wc: dataset_cfg(wc.dataset)["images"],
        weights=_grid_weights,
    output:
        shard=_grid_shard_output("results/features/{dataset}/grid_shards/{scatteritem}.h5"),
    params:
        grid={k: config["grid"][k] for k in ("image_size", "resize", "relu", "batch_size", "device", "workers")},
        code=code_version("extract_grid_shard.py"),
    wildcard_constraints:
        scatteritem=r"\d+-of-\d+",
    threads: config["grid"]["threads"]
    resources:
        mem_mb=config["grid"]["mem_mb"],
        runtime=config["grid"]["runtime"],
        **gpu_resources(config["grid"]),
    log:
        "logs/extract_grid/{dataset}.{scatteritem}.log",
    conda:
        "../../envs/features.yaml"
    script:
        "../scripts/extract_grid_shard.py"


rule gather_grid:
    """Concatenate the grid shards into grid.h5 ([N, 196, 512] float16, image order of images.parquet)."""
    input:
        shards=gather.grid("results/features/{{dataset}}/grid_shards/{scatteritem}.h5"),
        images="results/data/{dataset}/images.parquet",
    output:
        h5="results/features/{dataset}/grid.h5",
    params:
        block=config["grid"]["gather_block"],
        code=code_version("extract_grid_gather.py"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=120,
    log:
        "logs/gather_grid/{dataset}.log",
    conda:
        "../../envs/features.yaml"
    script:
        "../scripts/extract_grid_gather.py"
