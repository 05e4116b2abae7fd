# Text stages: tokens + vocabulary, referral trees, BERT features, tag vectors.
# Settings: config key `text` (see the README section "Text stages").

include: "text_functions.smk"


rule tokenize:
    """Tokenize captions (lowercase + nltk Treebank) and build the train-split vocabulary → vocab.json + tokens.parquet."""
    input:
        captions="results/data/{dataset}/captions.parquet",
    output:
        vocab="results/text/{dataset}/vocab.json",
        tokens="results/text/{dataset}/tokens.parquet",
    params:
        min_count=config["text"]["min_count"],
        code=code_version("text_tokenize.py"),
    threads: 1
    resources:
        mem_mb=6000,
        runtime=30,
    log:
        "logs/text/tokenize_{dataset}.log",
    conda:
        "../../envs/text.yaml"
    script:
        "../scripts/text_tokenize.py"


rule referral_trees:
    """SMFEA's 7-node referral tree per caption (gold parses or stanza) → trees.parquet + tree_vocab.json."""
    input:
        captions="results/data/{dataset}/captions.parquet",
        parses=lambda wc: (dataset_cfg(wc.dataset)["json"] if _text_parser(wc.dataset) == "gold"
                           else config["text"]["trees"]["stanza_dir"]),
    output:
        trees="results/text/{dataset}/trees.parquet",
        vocab="results/text/{dataset}/tree_vocab.json",
    params:
        parser=lambda wc: _text_parser(wc.dataset),
        trees=config["text"]["trees"],
        code=code_version("text_trees.py"),
    threads: 2
    resources:
        mem_mb=16000,
        runtime=lambda wc: 60 if _text_parser(wc.dataset) == "gold" else 720,
        gpu=lambda wc: int(_text_parser(wc.dataset) == "stanza") * uses_gpu(config["text"]["trees"]["device"]),
    log:
        "logs/text/referral_trees_{dataset}.log",
    conda:
        "../../envs/text.yaml"
    script:
        "../scripts/text_trees.py"


rule bert_features:
    """Per-word BERT features of every caption (GLFN) → bert.h5; batched, resumable."""
    input:
        captions="results/data/{dataset}/captions.parquet",
        tokens="results/text/{dataset}/tokens.parquet",
        model=lambda wc: _local_model(_bert_model(wc.dataset)),
    output:
        bert="results/text/{dataset}/bert.h5",
    params:
        model=lambda wc: _bert_model(wc.dataset),
        bert=config["text"]["bert"],
        code=code_version("text_bert.py"),
    threads: 2
    resources:
        mem_mb=12000,
        runtime=480,
        **gpu_resources(config["text"]["bert"]),
    log:
        "logs/text/bert_features_{dataset}.log",
    conda:
        "../../envs/text.yaml"
    script:
        "../scripts/text_bert.py"


rule tag_vectors:
    """BERT vectors of each region's "attribute object" tag phrase (GLFN) → tags.h5."""
    input:
        images="results/data/{dataset}/images.parquet",
        regions="results/features/{dataset}/regions.parquet",
        regions_h5="results/features/{dataset}/regions.h5",
        model=lambda wc: _local_model(_bert_model(wc.dataset)),
    output:
        tags="results/features/{dataset}/tags.h5",
    params:
        model=lambda wc: _bert_model(wc.dataset),
        bert=config["text"]["bert"],
        code=code_version("text_tags.py"),
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
        **gpu_resources(config["text"]["bert"]),
    log:
        "logs/text/tag_vectors_{dataset}.log",
    conda:
        "../../envs/text.yaml"
    script:
        "../scripts/text_tags.py"


# ---- model downloads (machines with internet access only) ------------------------------------------------


rule fetch_stanza_models:
    """Download stanza's English models into text.trees.stanza_dir (needs internet; never run by the parsing job)."""
    output:
        directory(config["text"]["trees"]["stanza_dir"]),
    params:
        processors="tokenize,pos,lemma,constituency",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    log:
        "logs/text/fetch_stanza_models.log",
    conda:
        "../../envs/text.yaml"
    script:
        "../scripts/text_fetch_models.py"


rule fetch_bert_model:
    """Download the BERT model named by text.bert.model (needs internet)."""
    output:
        directory(config["text"]["bert"]["model"]),
    params:
        hub_name=config["text"]["bert"]["hub_name"],
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    log:
        "logs/text/fetch_bert_model.log",
    conda:
        "../../envs/text.yaml"
    script:
        "../scripts/text_fetch_models.py"
