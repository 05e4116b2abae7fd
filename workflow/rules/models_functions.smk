# Helper functions of models.smk (kept apart from its rules: `snakemake --lint`).

def _model_code(model, script):
    """Code hash of ``script`` and of ``model``'s module (which the registry imports by name), with their imports."""
    return code_version(script, MODEL_CLASSES[model].split(":")[0])


def _model_inputs(wc):
    d = wc.dataset
    require_captions(d, wc.model)  # common.smk: an images-only dataset stops here, naming model and dataset
    inp = {"images": f"results/data/{d}/images.parquet", "captions": f"results/data/{d}/captions.parquet",
           "tokens": f"results/text/{d}/tokens.parquet", "vocab": f"results/text/{d}/vocab.json",
           "regions": f"results/features/{d}/regions.h5"}
    req = model_inputs(wc.model, model_settings(config, wc.model, d))
    if "blocks" in req:
        inp["blocks"] = f"results/features/{d}/blocks.h5"
    if "tags" in req:
        inp["tags"] = f"results/features/{d}/tags.h5"
    if "bert" in req:
        inp["bert"] = f"results/text/{d}/bert.h5"
    if "trees" in req:
        inp["trees"] = f"results/text/{d}/trees.parquet"
        inp["tree_vocab"] = f"results/text/{d}/tree_vocab.json"
    return inp


def _training(wc):
    return recipe(config, wc.model, wc.dataset)["training"]


def _model_cfg(wc):
    """The model block of the recipe; a fused model's part gets its direction."""
    return part_config(recipe(config, wc.model, wc.dataset)["model"], getattr(wc, "part", None))


def _parts(wc):
    return fused_parts(model_settings(config, wc.model, wc.dataset))
