"""Rule evaluate: test-split metrics of results/{model}/{dataset}/model.pt → metrics.json."""

from itmatch.evaluation.evaluate import run_evaluation
from itmatch.models.registry import INPUTS
from itmatch.training.data import Corpus, DataPaths
from itmatch.utils.logs import setup_job_logging

sm = snakemake  # noqa: F821 (injected by Snakemake)
setup_job_logging(sm.log[0])
inp = sm.input
paths = DataPaths(images=inp.images, captions=inp.captions, tokens=inp.tokens, vocab=inp.vocab, regions=inp.regions,
                  **{k: getattr(inp, k) for k in ("blocks", "tags", "bert", "trees") if hasattr(inp, k)})
model = sm.wildcards.model
config = {"dataset": sm.wildcards.dataset, "model": sm.params.model_cfg, "training": sm.params.training,
          "evaluation": sm.params.evaluation}
run_evaluation(model, inp.checkpoint, Corpus(paths, INPUTS[model]), sm.output.metrics,
               {**sm.params.evaluation, "threads": sm.threads}, config, sm.params.code)
