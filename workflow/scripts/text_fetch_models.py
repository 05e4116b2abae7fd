"""Rules fetch_stanza_models / fetch_bert_model: download text models (needs internet access)."""

from itmatch.utils.io import atomic_path
from itmatch.utils.logs import log, setup_job_logging

sm = snakemake  # noqa: F821 (injected by Snakemake)
setup_job_logging(sm.log[0])
out = sm.output[0]
try:
    with atomic_path(out) as tmp:
        if sm.rule == "fetch_stanza_models":
            import stanza

            stanza.download("en", model_dir=str(tmp), processors=sm.params.processors)
        else:
            from transformers import AutoModel, AutoTokenizer

            AutoTokenizer.from_pretrained(sm.params.hub_name).save_pretrained(str(tmp))
            AutoModel.from_pretrained(sm.params.hub_name).save_pretrained(str(tmp))
except Exception as e:  # noqa: BLE001 (any network failure gets the same advice)
    raise SystemExit(f"could not download into {out} ({type(e).__name__}: {e}). This rule needs internet "
                     f"access; on a machine without it, copy the folder to {out} (see config key text.*).") from e
log.info("models written to %s", out)
