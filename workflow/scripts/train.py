"""Rules train_part / train_model: train one model (or one direction of a fused one) with resume."""

from pathlib import Path

from itmatch.corpus.data import Corpus, DataPaths, TextOptions
from itmatch.models.registry import model_inputs
from itmatch.training.loop import train_model
from itmatch.utils.logs import setup_job_logging

sm = snakemake  # noqa: F821 (injected by Snakemake)
setup_job_logging(sm.log[0])
inp = sm.input
paths = DataPaths.from_inputs(inp)
model = sm.wildcards.model
part = getattr(sm.wildcards, "part", "")
training = {**sm.params.training, "threads": sm.threads}
corpus = Corpus(paths, model_inputs(model, sm.params.model_cfg),
                TextOptions.from_config(sm.params.model_cfg))
train_model(model, sm.params.model_cfg, training, corpus, sm.output.model, sm.output.log,
            state_path=Path(sm.output.model).parent / ".train_state.pt", input_files=list(sm.input), part=part)
