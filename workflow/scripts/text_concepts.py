"""Rule concepts: captions.parquet + tags/lemmas (gold JSON or stanza) → concepts.h5 (SMFEA's CAC, CVSE)."""

from itmatch.text.concepts import make_concepts
from itmatch.utils.logs import setup_job_logging

sm = snakemake  # noqa: F821 (injected by Snakemake)
setup_job_logging(sm.log[0])
t = sm.params.stanza
make_concepts(sm.input.captions, sm.output.concepts, parser=sm.params.parser,
              json_path=sm.input.parses if sm.params.parser == "gold" else None,
              stanza_dir=t["stanza_dir"], stanza_batch_size=t["stanza_batch_size"], device=t["device"],
              settings=sm.params.concepts)
