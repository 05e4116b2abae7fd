# Shared helpers of all the .smk files (config validation, wildcard constraints, per-dataset settings).
# Datasets are what config key `datasets` declares (shapes, coco, f30k and any of your own, by kind: karpathy,
# captions, images); every {dataset} wildcard follows it.
import os
import re

from snakemake.utils import validate

from itmatch.config import dataset_settings, deep_update, has_captions, validate_config
from itmatch.models.registry import MODELS
from itmatch.utils.device import local_gpu_count, uses_gpu
from itmatch.utils.hashing import code_hash

# Our validator first (messages name the key and the allowed values), then Snakemake's (fills defaults).
validate_config(config)
validate(config, "../schemas/config.schema.yaml")


def alternation(names):
    """A wildcard_constraints pattern matching exactly ``names`` (one that never matches when empty)."""
    return "|".join(re.escape(n) for n in names) if names else "(?!x)x"


wildcard_constraints:
    dataset=alternation(config["datasets"]),
    model=alternation(MODELS),


def dataset_cfg(dataset):
    """The config block of one dataset (over its kind's schema defaults, ``kind`` set), with a clear error for
    datasets the config does not define."""
    if dataset not in config["datasets"]:
        raise ValueError(f"dataset {dataset!r} is not configured under config key 'datasets' "
                         f"(configured: {', '.join(config['datasets'])})")
    return dataset_settings(config, dataset)


def require_captions(dataset, model=None):
    """Stop (while the DAG is built, before any job) when ``dataset`` has no captions (kind ``images``)."""
    if has_captions(config, dataset):
        return
    who = f"model {model!r} cannot be trained or evaluated on" if model else "captions, tokens and text features need"
    raise ValueError(
        f"{who} dataset {dataset!r}: it has no captions (datasets.{dataset}.kind is 'images': an image folder "
        f"only). Region extraction works on it (results/features/{dataset}/regions.h5); to train or evaluate, "
        f"declare it as kind 'captions' with a captions table (docs/data.md, \"Your own data\").")


def ingest_inputs(dataset):
    """The ingest inputs of a dataset, by kind: JSON + image folder (shapes, karpathy), image folder + captions
    table (captions), image folder [+ file list] (images). For ``source: local`` the JSON and folder must exist,
    else an error naming the missing ones (no rule will make them); the inputs of your own captions / images
    datasets are checked by Snakemake (a missing one is named as a missing input of rule ingest)."""
    cfg = dataset_cfg(dataset)
    if cfg["kind"] == "precomp":
        files = precomp_files(dataset)
        return {k: [p[k] for p in files.values() if p[k]] for k in ("caps", "ims", "ids")}
    if cfg["kind"] == "captions":
        return {"images": cfg["images"], "captions": cfg["captions"]}
    if cfg["kind"] == "images":
        return {"images": cfg["images"], **({"files": cfg["files"]} if cfg.get("files") else {})}
    files = {"json": cfg["json"], "images": cfg["images"]}
    if cfg.get("source") == "local":
        missing = [f"{files['json']} (datasets.{dataset}.json)"] if not os.path.isfile(files["json"]) else []
        if not os.path.isdir(files["images"]):
            missing.append(f"{files['images']} (datasets.{dataset}.images)")
        if missing:
            raise ValueError(f"datasets.{dataset}.source is 'local' (your own data, never generated or downloaded) "
                             f"but these are missing: {'; '.join(missing)}. Put them there, or change "
                             f"datasets.{dataset}.source.")
    return files


def ingest_options(dataset):
    """Global ``ingest`` settings with the dataset's own ``ingest`` block merged over them."""
    return deep_update(dict(config["ingest"]), dataset_cfg(dataset).get("ingest", {}))


def ingest_dataset_params(dataset):
    """What the ingest script needs of the dataset block besides its paths: the kind (+ a captions table's
    split settings, a precomp folder's splits); download settings stay out, so changing a mirror does not
    re-ingest."""
    cfg = dataset_cfg(dataset)
    if cfg["kind"] == "precomp":
        return {"kind": "precomp", "folder": cfg["folder"], "splits": cfg.get("splits") or {}, "boxes": cfg["boxes"]}
    return {"kind": cfg["kind"], **({"split": cfg["split"]} if cfg["kind"] == "captions" else {})}


def precomp_files(dataset):
    """The files of a precomp dataset's splits (itmatch.data.precomp.precomp_paths: an error naming the setting for
    a ``splits`` entry whose files are not in the folder; other missing files are Snakemake's missing inputs)."""
    from itmatch.data.precomp import precomp_paths

    cfg = dataset_cfg(dataset)
    return precomp_paths(cfg["folder"], cfg.get("splits"), cfg["boxes"], key=f"datasets.{dataset}", check=False)


def require_inputs(dataset, model, needs):
    """Stop (while the DAG is built, before any job) when ``model`` needs inputs (its ``model_inputs``) that the
    dataset cannot give: a precomp folder has no detector tags or object confidences, and blocks only with PFAN's
    position files."""
    cfg = dataset_cfg(dataset)
    if cfg["kind"] != "precomp":
        return
    from itmatch.data.precomp import precomp_missing

    missing = precomp_missing(needs, precomp_files(dataset), f"datasets.{dataset}")
    if missing:
        raise ValueError(f"model {model!r} cannot be trained or evaluated on dataset {dataset!r} (kind precomp, "
                         f"{cfg['folder']}): it needs {'; and '.join(missing)} (docs/precomp.md)")


SCRIPTS = os.path.join(workflow.basedir, "workflow", "scripts")


def code_version(script, *modules):
    """A rule's ``code`` param: the hash of the code it runs, derived from its script's import graph.

    ``script`` (a file in workflow/scripts) and every ``itmatch`` module it imports, transitively, plus
    ``modules`` that the script loads by name at run time (a model from the registry). Comments and
    docstrings do not count, so editing prose reruns nothing.
    """
    return code_hash(os.path.join(SCRIPTS, script), *modules)


# The `gpu` cap, unless `--resources gpu=N` (or a profile: the SLURM one sets 8) gives one: the GPUs this machine
# shows (CUDA_VISIBLE_DEVICES, else nvidia-smi; ITMATCH_SIMULATED_GPUS in tests), one GPU job per GPU; none on a
# machine without a GPU, so the GPU-eligible jobs (`device: auto`, running on the CPU there) are not serialised.
# (Set here, when the Snakefile is read: which executor will run the jobs is not known yet.)
if "gpu" not in workflow.global_resources and local_gpu_count() > 0:
    workflow.register_resource("gpu", local_gpu_count())


def gpu_resources(settings):
    """``resources: gpu=1`` exactly when a stage may run on CUDA (``device`` auto or cuda), ``gpu=0`` for ``cpu``.

    ``settings``: the stage's settings, or a function of the wildcards returning them (per-dataset overrides).
    Locally the `gpu` cap (above) runs one such job per visible GPU, each on a GPU of its own
    (itmatch.utils.device); on SLURM the profile turns gpu=1 into ``sbatch --gpus=1``.
    """
    if callable(settings):  # (``device``: filled from the schema by validate above)
        return {"gpu": lambda wc: uses_gpu(settings(wc)["device"])}
    return {"gpu": uses_gpu(settings["device"])}
