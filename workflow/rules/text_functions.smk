# Helper functions of text.smk (kept apart from its rules: `snakemake --lint`).

def _captions(wc):
    """A dataset's captions.parquet (the text stages' input); an images-only dataset stops here (no captions)."""
    require_captions(wc.dataset)
    return f"results/data/{wc.dataset}/captions.parquet"


def _vocab_settings(wc):
    """make_tokens keywords of a dataset ({} for all but precomp: train-split vocabulary by count)."""
    from itmatch.text.vocab import vocab_settings

    return vocab_settings(dataset_cfg(wc.dataset)["kind"], dataset_cfg(wc.dataset))


def _vocab_file(wc):
    """A precomp dataset's SCAN vocabulary file (datasets.<name>.vocab), as an input; none otherwise."""
    f = _vocab_settings(wc).get("vocab_file")
    return [f] if f else []


def _text_parser(dataset):
    return config["text"]["trees"]["parser"].get(dataset, "stanza")


_TREE_DICTIONARY_KEYS = ("entity_min_count", "relation_min_count", "max_entities", "max_relations")


def _stanza_gpu(dataset):
    """``resources: gpu`` of a stanza job: 1 unless text.trees.device is cpu; 0 for gold parses."""
    return int(_text_parser(dataset) == "stanza") * uses_gpu(config["text"]["trees"]["device"])


def _parses_input(dataset):
    """Where referral trees and concepts get tags and lemmas: the dataset JSON (gold) or stanza's model folder."""
    return dataset_cfg(dataset)["json"] if _text_parser(dataset) == "gold" else config["text"]["trees"]["stanza_dir"]


def _bert_model(dataset):
    b = config["text"]["bert"]
    return (b.get("dataset_model") or {}).get(dataset, b["model"])


def _local_model(spec):
    """The model folder as an input (so fetch_bert_model can make it); nothing for package: models."""
    return [] if spec.startswith("package:") else [spec]
