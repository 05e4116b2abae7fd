# Helper functions of models.smk (kept apart from its rules: `snakemake --lint`).
# Every one takes the job's wildcards: a variant's jobs (results/{model}/{dataset}/{variant}/) have `variant`,
# the base model's do not; the settings are itmatch.training.settings.recipe of (model, dataset, variant).

def _model_code(model, script):
    """Code hash of ``script`` and of ``model``'s module (which the registry imports by name), with their imports."""
    return code_version(script, MODEL_CLASSES[model].split(":")[0])


def _variant(wc):
    return getattr(wc, "variant", None)


def _model_settings(wc):
    """The resolved model settings of the job's model, dataset and (if any) variant."""
    return model_settings(config, wc.model, wc.dataset, _variant(wc))


def _model_inputs(wc):
    return _data_inputs(wc.model, wc.dataset, _model_settings(wc))


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
    if "grid" in req:
        inp["grid"] = f"results/features/{d}/grid.h5"
    if "trees" in req:
        inp["trees"] = f"results/text/{d}/trees.parquet"
        inp["tree_vocab"] = f"results/text/{d}/tree_vocab.json"
    if "concepts" in req:
        inp["concepts"] = f"results/text/{d}/concepts.h5"
    return inp


def _training(wc):
    return recipe(config, wc.model, wc.dataset, _variant(wc))["training"]


def _model_cfg(wc):
    """The model block of the recipe; a fused model's part gets its direction."""
    return part_config(recipe(config, wc.model, wc.dataset, _variant(wc))["model"], getattr(wc, "part", None))


def _parts(wc):
    return fused_parts(_model_settings(wc))


def _run_dir(wc):
    """results/{model}/{dataset}, or results/{model}/{dataset}/{variant} for a variant's job."""
    run = f"results/{wc.model}/{wc.dataset}"
    return f"{run}/{_variant(wc)}" if _variant(wc) else run


def _part_files(wc, name):
    """``name`` (model.pt / train_log.csv) of each separately trained direction of a fused model (or variant)."""
    return [f"{_run_dir(wc)}/{p}/{name}" for p in _parts(wc)]


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
