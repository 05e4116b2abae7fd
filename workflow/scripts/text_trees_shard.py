"""Rule referral_trees_shard: one resumable shard of referral-tree parses (gold JSON or stanza), captions/s recorded."""

from itmatch.text.trees import parse_shard
from itmatch.utils.logs import setup_job_logging
from itmatch.utils.shards import parse_scatteritem

sm = snakemake  # noqa: F821 (injected by Snakemake)
setup_job_logging(sm.log[0])
shard, n_shards = parse_scatteritem(sm.wildcards.scatteritem)
t = sm.params.trees
parse_shard(sm.input.captions, sm.output.shard, shard, n_shards, parser=sm.params.parser,
            json_path=sm.input.parses if sm.params.parser == "gold" else None, stanza_dir=t["stanza_dir"],
            stanza_batch_size=t["stanza_batch_size"], device=t["device"], block=t["block"],
            record_path=sm.output.record)
