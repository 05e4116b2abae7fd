# Data: the embedded `shapes` generator and the ingest shared by all datasets (by kind: Karpathy JSON, captions
# table or image folder; docs/data.md "Your own data").
# A dataset whose `source` is `local` holds the user's own JSON and images: no rule has them as output
# (generate_shapes exists only for `source: generate`), so nothing can overwrite them, not even --forceall.
# Missing local files: an error naming them (local_dataset_inputs in common.smk).


if config["datasets"].get("shapes", {}).get("source") == "generate":

    rule generate_shapes:
        """Generate the embedded synthetic `shapes` dataset (Karpathy JSON + images) from datasets.shapes.generator."""
        output:
            json=config["datasets"]["shapes"]["json"],
            images=directory(config["datasets"]["shapes"]["images"]),
        params:
            generator=config["datasets"]["shapes"]["generator"],
            code=code_version("generate_shapes.py"),
        threads: 2
        resources:
            mem_mb=2000,
            runtime=30,
        log:
            "logs/generate_shapes/shapes.log",
        conda:
            "../../envs/data.yaml"
        script:
            "../scripts/generate_shapes.py"


rule ingest:
    """Check a dataset's inputs (Karpathy JSON, captions table or image folder) and images → images.parquet + captions.parquet."""
    input:
        unpack(lambda wc: ingest_inputs(wc.dataset)),
    output:
        images="results/data/{dataset}/images.parquet",
        captions="results/data/{dataset}/captions.parquet",
    params:
        options=lambda wc: ingest_options(wc.dataset),
        dataset=lambda wc: ingest_dataset_params(wc.dataset),
        bad_images=lambda wc: f"resources/{wc.dataset}/bad_images.txt",  # the download's image check
        code=code_version("ingest.py"),
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
    log:
        "logs/ingest/{dataset}.log",
    conda:
        "../../envs/data.yaml"
    script:
        "../scripts/ingest.py"
