"""Rule evaluate_imported: test-split metrics of an imported released checkpoint (itmatch import-checkpoint)."""

from itmatch.corpus.data import Corpus, DataPaths, TextOptions
from itmatch.evaluation.evaluate import run_evaluation
from itmatch.models.registry import model_inputs
from itmatch.utils.logs import setup_job_logging

sm = snakemake  # noqa: F821 (injected by Snakemake)
setup_job_logging(sm.log[0])
inp = sm.input
model, dataset, cfg = sm.params.imported["model"], sm.params.imported["dataset"], sm.params.model_cfg
config = {"dataset": dataset, "model": cfg, "imported": sm.params.imported, "evaluation": sm.params.evaluation}
run_evaluation(model, inp.checkpoint, Corpus(DataPaths.from_inputs(inp), model_inputs(model, cfg),
               TextOptions.from_config(cfg)), sm.output.metrics, {**sm.params.evaluation, "threads": sm.threads},
               config, sm.params.code)
