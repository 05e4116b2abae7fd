# Helper functions of features.smk (kept apart from its rules: `snakemake --lint`).

def _import_spec(dataset):
    """``extraction.import.<dataset>``; for a precomp dataset, its folder's .npy files (SCAN's features, PFAN's
    position files when used: itmatch.data.precomp.precomp_import_spec)."""
    if dataset_cfg(dataset)["kind"] == "precomp":
        from itmatch.data.precomp import precomp_import_spec

        return precomp_import_spec(precomp_files(dataset))
    return (config["extraction"].get("import") or {}).get(dataset)


def _datasets_where(pred):
    return alternation([d for d in config["datasets"] if pred(d)])


def _pfan_imported(dataset):
    """Whether the dataset's PFAN block files are imported (extraction.import.<dataset>.pfan_boxes)."""
    return bool((_import_spec(dataset) or {}).get("pfan_boxes"))


def _detector_cfg(dataset):
    from itmatch.features.detector import detector_config

    return detector_config(config["detector"], dataset)


def _detector_checkpoint(dataset):
    from itmatch.features.detector import checkpoint_path

    try:
        return checkpoint_path(config["detector"], dataset, must_exist=False)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}; or import existing features with extraction.import.{dataset}") from None


def _import_sources(dataset, key="features"):
    """Input files of an import (so Snakemake checks they exist and reruns when they change)."""
    spec = _import_spec(dataset) or {}
    if key == "pfan":
        return [p for s in (spec.get("pfan_boxes") or {}).values() for p in (s.get("boxes"), s.get("ids")) if p]
    fmt = spec.get("format")
    if fmt == "tsv":
        return list(spec["files"])
    if fmt == "npz":
        return [spec["folder"]]
    if fmt == "h5":
        return [spec["file"]]
    if fmt == "scan_npy":
        return [p for s in spec["splits"].values() for p in (s.get("features"), s.get("ids")) if p]
    return []


def _shard_output(path):
    return path if config["extraction"]["keep_shards"] else temp(path)
