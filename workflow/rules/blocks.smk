# Block-overlap index (PFAN / GLFN position input): the L cells of a K×K grid each region overlaps most.
# Datasets whose PFAN block files are imported (rule import_pfan_blocks, features.smk) are excluded here.


rule blocks:
    """PFAN's block-overlap index (blocks.h5) from the boxes of regions.h5: top-L cells of a K×K grid per region."""
    input:
        regions="results/features/{dataset}/regions.h5",
    output:
        blocks="results/features/{dataset}/blocks.h5",
    params:
        K=config["blocks"]["K"],
        L=config["blocks"]["L"],
        code=code_version("blocks.py"),
    wildcard_constraints:
        dataset=_datasets_where(lambda d: not _pfan_imported(d)),  # features_functions.smk
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    log:
        "logs/blocks/{dataset}.log",
    conda:
        "../../envs/features.yaml"
    script:
        "../scripts/blocks.py"
