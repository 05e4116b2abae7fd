"""Rule pfan_figure6: trained PFAN + test data → a picture like the paper's Figure 6 (PNG)."""

import json

from itmatch.corpus.data import Corpus, DataPaths, TextOptions
from itmatch.models.registry import model_inputs
from itmatch.report.pfan_figure import pfan_figure
from itmatch.utils.logs import log, setup_job_logging

sm = snakemake  # noqa: F821 (injected by Snakemake)
setup_job_logging(sm.log[0])
inp = sm.input
corpus = Corpus(DataPaths.from_inputs(inp), model_inputs("pfan", sm.params.model_cfg),
                TextOptions.from_config(sm.params.model_cfg))
with open(inp.vocab, encoding="utf-8") as fh:
    words = json.load(fh)["idx2word"]
fig = sm.params.figure
drawn = pfan_figure(inp.checkpoint, corpus, inp.image_dir, words, sm.output[0],
                    n_images=fig["n_images"], n_regions=fig["n_regions"], n_blocks=fig["n_blocks"])
log.info("figure 6: %s", json.dumps(drawn, default=float))
