# Text stages: tokens + vocabulary, referral trees, concepts, BERT features, tag vectors.
# Settings: config key `text` (see the README section "Text stages").

include: "text_functions.smk"


rule tokenize:
    """Tokenize captions (lowercase + nltk Treebank; precomp: SCAN's tokenisation) and build the vocabulary → vocab.json + tokens.parquet."""
    input:
        captions=_captions,
        vocab_file=_vocab_file,
    output:
        vocab="results/text/{dataset}/vocab.json",
        tokens="results/text/{dataset}/tokens.parquet",
    params:
        min_count=config["text"]["min_count"],
        vocab=_vocab_settings,
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


# Referral trees and BERT features are sharded (like region extraction): text.trees.shards / text.bert.shards
# or --set-scatter trees=N / bert=N jobs, each over whole blocks of contiguous captions.parquet rows, resumable,
# with a captions/s record (…_shards/{i}-of-{n}.json); the gathers write the same files one job would.

scattergather:
    trees=config["text"]["trees"]["shards"],
    bert=config["text"]["bert"]["shards"],


rule referral_trees_shard:
    """Parses (gold or stanza) of one contiguous shard of captions.parquet for the referral trees; resumable, captions/s recorded."""
    input:
        captions=_captions,
        parses=lambda wc: _parses_input(wc.dataset),
    output:
        shard=temp("results/text/{dataset}/tree_shards/{scatteritem}.parquet"),
        record="results/text/{dataset}/tree_shards/{scatteritem}.json",
    params:
        parser=lambda wc: _text_parser(wc.dataset),
        trees={k: config["text"]["trees"][k] for k in ("stanza_dir", "stanza_batch_size", "device", "block")},
        code=code_version("text_trees_shard.py"),
    wildcard_constraints:
        scatteritem=r"\d+-of-\d+",
    threads: 2
    resources:
        mem_mb=8000,
        runtime=lambda wc: 60 if _text_parser(wc.dataset) == "gold" else 720,
        gpu=lambda wc: _stanza_gpu(wc.dataset),
    log:
        "logs/text/referral_trees_shard/{dataset}.{scatteritem}.log",
    conda:
        "../../envs/text.yaml"
    script:
        "../scripts/text_trees_shard.py"


rule referral_trees:
    """SMFEA's 7-node referral tree per caption from the gathered parse shards, dictionaries from train → trees.parquet + tree_vocab.json."""
    input:
        shards=gather.trees("results/text/{{dataset}}/tree_shards/{scatteritem}.parquet"),
        records=gather.trees("results/text/{{dataset}}/tree_shards/{scatteritem}.json"),
        captions=_captions,
    output:
        trees="results/text/{dataset}/trees.parquet",
        vocab="results/text/{dataset}/tree_vocab.json",
    params:
        parser=lambda wc: _text_parser(wc.dataset),
        dictionaries={k: config["text"]["trees"][k] for k in _TREE_DICTIONARY_KEYS},
        code=code_version("text_trees.py"),
    threads: 1
    resources:
        mem_mb=16000,
        runtime=60,
    log:
        "logs/text/referral_trees_{dataset}.log",
    conda:
        "../../envs/text.yaml"
    script:
        "../scripts/text_trees.py"


rule concepts:
    """SMFEA's CAC concepts (CVSE): train-caption concept vocabulary, per-caption labels, correlation graph → concepts.h5."""
    input:
        captions=_captions,
        parses=lambda wc: _parses_input(wc.dataset),
    output:
        concepts="results/text/{dataset}/concepts.h5",
    params:
        parser=lambda wc: _text_parser(wc.dataset),
        stanza={k: config["text"]["trees"][k] for k in ("stanza_dir", "stanza_batch_size", "device")},
        concepts=config["text"]["concepts"],
        code=code_version("text_concepts.py"),
    threads: 2
    resources:
        mem_mb=8000,
        runtime=lambda wc: 30 if _text_parser(wc.dataset) == "gold" else 240,
        gpu=lambda wc: _stanza_gpu(wc.dataset),
    log:
        "logs/text/concepts_{dataset}.log",
    conda:
        "../../envs/text.yaml"
    script:
        "../scripts/text_concepts.py"


rule bert_features_shard:
    """Per-word BERT features (GLFN) of one contiguous shard of captions.parquet; batched, resumable per block, captions/s recorded."""
    input:
        captions=_captions,
        tokens="results/text/{dataset}/tokens.parquet",
        model=lambda wc: _local_model(_bert_model(wc.dataset)),
    output:
        shard=temp("results/text/{dataset}/bert_shards/{scatteritem}.h5"),
        record="results/text/{dataset}/bert_shards/{scatteritem}.json",
    params:
        model=lambda wc: _bert_model(wc.dataset),
        bert={k: config["text"]["bert"][k] for k in ("batch_size", "max_length", "device", "block")},
        code=code_version("text_bert_shard.py"),
    wildcard_constraints:
        scatteritem=r"\d+-of-\d+",
    threads: 2
    resources:
        mem_mb=12000,
        runtime=480,
        **gpu_resources(config["text"]["bert"]),
    log:
        "logs/text/bert_features_shard/{dataset}.{scatteritem}.log",
    conda:
        "../../envs/text.yaml"
    script:
        "../scripts/text_bert_shard.py"


rule bert_features:
    """Concatenate the BERT shards into bert.h5 (ragged per-word features of every caption, GLFN)."""
    input:
        shards=gather.bert("results/text/{{dataset}}/bert_shards/{scatteritem}.h5"),
        records=gather.bert("results/text/{{dataset}}/bert_shards/{scatteritem}.json"),
        captions=_captions,
        tokens="results/text/{dataset}/tokens.parquet",
    output:
        bert="results/text/{dataset}/bert.h5",
    params:
        code=code_version("text_bert.py"),
    threads: 1
    resources:
        mem_mb=8000,
        runtime=120,
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
