# Helper functions of text.smk (kept apart from its rules: `snakemake --lint`).

def _captions(wc):
    """A dataset's captions.parquet (the text stages' input); an images-only dataset stops here (no captions)."""
    require_captions(wc.dataset)
    return f"results/data/{wc.dataset}/captions.parquet"


def _text_parser(dataset):
    return config["text"]["trees"]["parser"].get(dataset, "stanza")


def _bert_model(dataset):
    b = config["text"]["bert"]
    return (b.get("dataset_model") or {}).get(dataset, b["model"])


def _local_model(spec):
    """The model folder as an input (so fetch_bert_model can make it); nothing for package: models."""
    return [] if spec.startswith("package:") else [spec]
