# Helper functions of models.smk (kept apart from its rules: `snakemake --lint`).

def _model_code(model, script):
    """Code hash of ``script`` and of ``model``'s module (which the registry imports by name), with their imports."""
    return code_version(script, MODEL_CLASSES[model].split(":")[0])


def _model_inputs(wc):
    return _data_inputs(wc.model, wc.dataset, model_settings(config, wc.model, wc.dataset))


def _data_inputs(model, d, settings):
    """The artifacts ``model`` with ``settings`` reads on dataset ``d``."""
    require_captions(d, model)  # common.smk: an images-only dataset stops here, naming model and dataset
    inp = {"images": f"results/data/{d}/images.parquet", "captions": f"results/data/{d}/captions.parquet",
           "tokens": f"results/text/{d}/tokens.parquet", "vocab": f"results/text/{d}/vocab.json",
           "regions": f"results/features/{d}/regions.h5"}
    req = model_inputs(model, settings)
    require_inputs(d, model, req)  # common.smk: e.g. PFAN on a precomp folder without PFAN's position files
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


def _imported(wc):
    """results/imported/{run}/import.json (written by `itmatch import-checkpoint`): model, dataset, settings."""
    import json

    path = f"results/imported/{wc.run}/import.json"
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist: import a released checkpoint first, e.g. `itmatch "
                         f"import-checkpoint scan model_best.pth.tar --dataset NAME --out results/imported/{wc.run}`")
    with open(path, encoding="utf-8") as fh:
        rec = json.load(fh)
    if rec.get("dataset") not in config["datasets"]:
        raise ValueError(f"{path}: dataset {rec.get('dataset')!r} is not configured under config key 'datasets'")
    return rec


def _imported_inputs(wc):
    rec = _imported(wc)
    return {**_data_inputs(rec["model"], rec["dataset"], rec["settings"]),
            "checkpoint": f"results/imported/{wc.run}/model.pt", "record": f"results/imported/{wc.run}/import.json"}
