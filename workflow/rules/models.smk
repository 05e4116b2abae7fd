# Training and evaluation of every model: results/{model}/{dataset}/{model.pt,train_log.csv,metrics.json}.
# Generic over {model}: the inputs come from INPUTS[model] (itmatch/models/registry.py). Models with
# models.<model>.fuse (SCAN, PFAN: [t2i, i2t]) train one model per direction under
# results/{model}/{dataset}/{part}/ and rule fuse_parts combines them (evaluation averages their scores).

include: "models_functions.smk"

from itmatch.models.registry import INPUTS
from itmatch.training.settings import (evaluation_settings, fused_parts, model_settings, part_config,
                                       training_settings)

_FUSED = [m for m in MODELS if fused_parts((config["models"].get(m) or {}))]
_SINGLE = [m for m in MODELS if m not in _FUSED]
_COMMON_CODE = ("itmatch.models.base", "itmatch.models.encoders", "itmatch.models.attention",
                "itmatch.models.registry", "itmatch.training")
_MODEL_CODE = {"pfan": ("itmatch.models.pfan", "itmatch.models.scan"),
               "smfea": ("itmatch.models.smfea", "itmatch.models.tree_lstm"),
               "glfn": ("itmatch.models.glfn", "itmatch.models.pfan", "itmatch.models.scan")}

_T = config["training"]
_E = config["evaluation"]


rule train_part:
    input:
        unpack(_model_inputs),
    output:
        model="results/{model}/{dataset}/{part}/model.pt",
        log="results/{model}/{dataset}/{part}/train_log.csv",
    params:
        model_cfg=lambda wc: part_config(model_settings(config, wc.model, wc.dataset), wc.part),
        training=_training,
        code=lambda wc: _model_code(wc.model),
    wildcard_constraints:
        model=alternation(_FUSED),
        part="t2i|i2t",
    threads: lambda wc: _training(wc)["threads"]
    resources:
        mem_mb=lambda wc: _training(wc)["mem_mb"],
        runtime=lambda wc: _training(wc)["runtime"],
        **gpu_resources(_training),
    log:
        "logs/train/{model}/{dataset}.{part}.log",
    conda:
        "../../envs/models.yaml"
    script:
        "../scripts/train.py"


rule train_model:
    input:
        unpack(_model_inputs),
    output:
        model="results/{model}/{dataset}/model.pt",
        log="results/{model}/{dataset}/train_log.csv",
    params:
        model_cfg=lambda wc: part_config(model_settings(config, wc.model, wc.dataset), None),
        training=_training,
        code=lambda wc: _model_code(wc.model),
    wildcard_constraints:
        model=alternation(_SINGLE),
    threads: lambda wc: _training(wc)["threads"]
    resources:
        mem_mb=lambda wc: _training(wc)["mem_mb"],
        runtime=lambda wc: _training(wc)["runtime"],
        **gpu_resources(_training),
    log:
        "logs/train/{model}/{dataset}.log",
    conda:
        "../../envs/models.yaml"
    script:
        "../scripts/train.py"

rule fuse_parts:
    input:
        models=lambda wc: [f"results/{wc.model}/{wc.dataset}/{p}/model.pt" for p in _parts(wc)],
        logs=lambda wc: [f"results/{wc.model}/{wc.dataset}/{p}/train_log.csv" for p in _parts(wc)],
    output:
        model="results/{model}/{dataset}/model.pt",
        log="results/{model}/{dataset}/train_log.csv",
    params:
        parts=_parts,
        code=code_version("itmatch.training.loop"),
    wildcard_constraints:
        model=alternation(_FUSED),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    log:
        "logs/fuse/{model}/{dataset}.log",
    conda:
        "../../envs/models.yaml"
    script:
        "../scripts/fuse_parts.py"


rule evaluate:
    input:
        unpack(_model_inputs),
        checkpoint="results/{model}/{dataset}/model.pt",
    output:
        metrics="results/{model}/{dataset}/metrics.json",
    params:
        evaluation=lambda wc: evaluation_settings(config, wc.dataset),
        model_cfg=lambda wc: model_settings(config, wc.model, wc.dataset),
        training=_training,
        code=lambda wc: _model_code(wc.model, "itmatch.evaluation"),
    threads: _E["threads"]
    resources:
        mem_mb=lambda wc: evaluation_settings(config, wc.dataset)["mem_mb"],
        runtime=_E["runtime"],
        **gpu_resources(lambda wc: evaluation_settings(config, wc.dataset)),
    log:
        "logs/evaluate/{model}/{dataset}.log",
    conda:
        "../../envs/models.yaml"
    script:
        "../scripts/evaluate.py"
