# Shared helpers of all the .smk files (config validation, wildcard constraints, per-dataset settings).
import os

from snakemake.utils import validate

from itmatch.config import DATASETS, deep_update, validate_config
from itmatch.models.registry import MODELS
from itmatch.utils.device import local_gpu_count, uses_gpu
from itmatch.utils.hashing import code_hash

# Our validator first (messages name the key and the allowed values), then Snakemake's (fills defaults).
validate_config(config)
validate(config, "../schemas/config.schema.yaml")


wildcard_constraints:
    dataset="|".join(DATASETS),
    model="|".join(MODELS),


def dataset_cfg(dataset):
    """The config block of one dataset, with a clear error for datasets the config does not define."""
    if dataset not in config["datasets"]:
        raise ValueError(f"dataset {dataset!r} is not configured under config key 'datasets' "
                         f"(configured: {', '.join(config['datasets'])})")
    return config["datasets"][dataset]


def local_dataset_inputs(dataset):
    """The JSON and image folder of a dataset (the ingest inputs); for ``source: local`` both must exist,
    else an error naming the missing ones (no rule will make them)."""
    cfg = dataset_cfg(dataset)
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


SCRIPTS = os.path.join(workflow.basedir, "workflow", "scripts")


def code_version(script, *modules):
    """A rule's ``code`` param: the hash of the code it runs, derived from its script's import graph.

    ``script`` (a file in workflow/scripts) and every ``itmatch`` module it imports, transitively, plus
    ``modules`` that the script loads by name at run time (a model from the registry). Comments and
    docstrings do not count, so editing prose reruns nothing.
    """
    return code_hash(os.path.join(SCRIPTS, script), *modules)


def alternation(names):
    """A wildcard_constraints pattern matching exactly ``names`` (one that never matches when empty)."""
    return "|".join(names) if names else "(?!x)x"


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
    if callable(settings):
        return {"gpu": lambda wc: uses_gpu(settings(wc).get("device", "auto"))}
    return {"gpu": uses_gpu(settings.get("device", "auto"))}
