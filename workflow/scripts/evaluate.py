"""Rules evaluate / evaluate_variant: the test-split similarity matrix of results/{model}/{dataset}[/{variant}]/
model.pt → sims.h5, and from it ranks.parquet and metrics.json."""

from itmatch.corpus.data import Corpus, DataPaths, TextOptions
from itmatch.evaluation.evaluate import run_evaluation
from itmatch.models.registry import model_inputs
from itmatch.utils.logs import setup_job_logging

sm = snakemake  # noqa: F821 (injected by Snakemake)
setup_job_logging(sm.log[0])
inp = sm.input
paths = DataPaths.from_inputs(inp)
model = sm.wildcards.model
config = {"dataset": sm.wildcards.dataset, "variant": getattr(sm.wildcards, "variant", None),
          "model": sm.params.model_cfg, "training": sm.params.training, "evaluation": sm.params.evaluation}
run_evaluation(model, inp.checkpoint, Corpus(paths, model_inputs(model, sm.params.model_cfg),
                TextOptions.from_config(sm.params.model_cfg)), sm.output.metrics,
               {**sm.params.evaluation, "threads": sm.threads}, config, sm.params.code, sims_path=sm.output.sims,
               ranks_path=sm.output.ranks)
