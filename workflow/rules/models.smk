# Training and evaluation of every model: results/{model}/{dataset}/{model.pt,train_log.csv,metrics.json,sims.h5,
# ranks.parquet}, and of every ablation variant (config `variants`) in results/{model}/{dataset}/{variant}/ by the
# same rules (`use rule ... as ..._variant`): the same inputs (regions, blocks, text stages), the variant's settings.
# The train rules' `training` / `model_cfg` params are itmatch.training.settings.recipe (= `itmatch recipe`).
# Generic over {model}: the inputs come from model_inputs(model, settings) (itmatch/models/registry.py). Models with
# models.<model>.fuse (SCAN, PFAN: [t2i, i2t]) train one model per direction under
# results/{model}/{dataset}/{part}/ and rule fuse_parts combines them (evaluation averages their scores).

include: "models_functions.smk"

from itmatch.models.registry import MODEL_CLASSES, model_inputs
from itmatch.training.settings import evaluation_settings, fused_parts, model_settings, part_config, recipe

_FUSED = [m for m in MODELS if fused_parts((config["models"].get(m) or {}))]
_SINGLE = [m for m in MODELS if m not in _FUSED]

_T = config["training"]
_VARIANTS = sorted({name for per_model in config["variants"].values() for name in (per_model or {})})
_E = config["evaluation"]


rule train_part:
    """Train one direction (t2i or i2t) of a fused model (SCAN, PFAN, GLFN); best model by validation rSum; resumable."""
    input:
        unpack(_model_inputs),
    output:
        model="results/{model}/{dataset}/{part}/model.pt",
        log="results/{model}/{dataset}/{part}/train_log.csv",
    params:
        model_cfg=_model_cfg,
        training=_training,
        code=lambda wc: _model_code(wc.model, "train.py"),
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
    """Train a single (non-fused) model; best model by validation rSum; resumable."""
    input:
        unpack(_model_inputs),
    output:
        model="results/{model}/{dataset}/model.pt",
        log="results/{model}/{dataset}/train_log.csv",
    params:
        model_cfg=_model_cfg,
        training=_training,
        code=lambda wc: _model_code(wc.model, "train.py"),
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
    """Join the t2i and i2t models of a fused model into one model.pt (evaluation averages their scores)."""
    input:
        models=lambda wc: _part_files(wc, "model.pt"),
        logs=lambda wc: _part_files(wc, "train_log.csv"),
    output:
        model="results/{model}/{dataset}/model.pt",
        log="results/{model}/{dataset}/train_log.csv",
    params:
        parts=_parts,
        code=code_version("fuse_parts.py"),
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
    """Evaluate a trained model on the test split: its similarity matrix (sims.h5), then from it every query's rank and top-10 (ranks.parquet) and R@1/5/10 both ways and rSum (1K, COCO 5-fold 1K and 5K) → metrics.json."""
    input:
        unpack(_model_inputs),
        checkpoint="results/{model}/{dataset}/model.pt",
    output:
        metrics="results/{model}/{dataset}/metrics.json",
        sims="results/{model}/{dataset}/sims.h5",
        ranks="results/{model}/{dataset}/ranks.parquet",
    params:
        evaluation=lambda wc: evaluation_settings(config, wc.dataset),
        model_cfg=_model_settings,
        training=_training,
        code=lambda wc: _model_code(wc.model, "evaluate.py"),
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


# Ablation variants: results/{model}/{dataset}/{variant}/... (a variant name never matches t2i / i2t nor contains
# "/", so results/{model}/{dataset}/{part}/model.pt and results/{model}/{dataset}/metrics.json stay unambiguous).


use rule train_part as train_variant_part with:
    """Train one direction of a fused model's ablation variant (its settings: config variants.<model>.<variant>)."""
    output:
        model="results/{model}/{dataset}/{variant}/{part}/model.pt",
        log="results/{model}/{dataset}/{variant}/{part}/train_log.csv",
    wildcard_constraints:
        model=alternation(_FUSED),
        part="t2i|i2t",
        variant=alternation(_VARIANTS),
    log:
        "logs/train/{model}/{dataset}/{variant}.{part}.log",


use rule train_model as train_variant with:
    """Train an ablation variant of a single (non-fused) model (its settings: config variants.<model>.<variant>)."""
    output:
        model="results/{model}/{dataset}/{variant}/model.pt",
        log="results/{model}/{dataset}/{variant}/train_log.csv",
    wildcard_constraints:
        model=alternation(_SINGLE),
        variant=alternation(_VARIANTS),
    log:
        "logs/train/{model}/{dataset}/{variant}.log",


use rule fuse_parts as fuse_variant_parts with:
    """Join the trained directions of a fused model's ablation variant into its model.pt."""
    output:
        model="results/{model}/{dataset}/{variant}/model.pt",
        log="results/{model}/{dataset}/{variant}/train_log.csv",
    wildcard_constraints:
        model=alternation(_FUSED),
        variant=alternation(_VARIANTS),
    log:
        "logs/fuse/{model}/{dataset}/{variant}.log",


use rule evaluate as evaluate_variant with:
    """Evaluate an ablation variant's model (results/{model}/{dataset}/{variant}/model.pt) → metrics, sims, ranks."""
    input:
        unpack(_model_inputs),
        checkpoint="results/{model}/{dataset}/{variant}/model.pt",
    output:
        metrics="results/{model}/{dataset}/{variant}/metrics.json",
        sims="results/{model}/{dataset}/{variant}/sims.h5",
        ranks="results/{model}/{dataset}/{variant}/ranks.parquet",
    wildcard_constraints:
        variant=alternation(_VARIANTS),
    log:
        "logs/evaluate/{model}/{dataset}/{variant}.log",


rule evaluate_imported:
    """Evaluate a released SCAN / PFAN checkpoint imported by `itmatch import-checkpoint` on its dataset's test split → metrics.json."""
    input:
        unpack(_imported_inputs),
    output:
        metrics="results/imported/{run}/metrics.json",
    params:
        imported=lambda wc: {k: _imported(wc)[k] for k in ("model", "dataset")},
        model_cfg=lambda wc: _imported(wc)["settings"],
        evaluation=lambda wc: evaluation_settings(config, _imported(wc)["dataset"]),
        code=lambda wc: _model_code(_imported(wc)["model"], "evaluate_imported.py"),
    wildcard_constraints:
        run=r"[^/]+",
    threads: _E["threads"]
    resources:
        mem_mb=lambda wc: evaluation_settings(config, _imported(wc)["dataset"])["mem_mb"],
        runtime=_E["runtime"],
        **gpu_resources(lambda wc: evaluation_settings(config, _imported(wc)["dataset"])),
    log:
        "logs/evaluate_imported/{run}.log",
    conda:
        "../../envs/models.yaml"
    script:
        "../scripts/evaluate_imported.py"
