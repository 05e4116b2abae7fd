# Download / local acquisition of the real datasets (coco, f30k): one rule per dataset whose
# `datasets.{ds}.source` is `download`, driven by `datasets.{ds}.download` (see README "Real datasets").
# Its outputs are exactly the JSON and image folder that rule ingest reads, plus the marker
# resources/{ds}/.verified written last, so a finished acquisition is skipped next time.
# resources/{ds}/bad_images.txt (the image check's report) is deliberately not an output: it must
# survive a failed run. Downloaded archives live in `download.cache` with their verification record,
# so a rerun (e.g. after changing a URL to a mirror) re-extracts but never re-downloads a verified file.
# No `code=` param here: the acquired data do not depend on the code's version, and a code update
# should not re-extract 20 GB of images.


def download_datasets():
    """Karpathy-format datasets (coco, f30k, your own of kind karpathy) with ``source: download``."""
    return [ds for ds in config["datasets"]
            if dataset_cfg(ds)["kind"] == "karpathy" and dataset_cfg(ds).get("source") == "download"]


for _ds in download_datasets():
    _cfg = dataset_cfg(_ds)
    _name = re.sub(r"\W", "_", _ds)  # dataset names may hold "-" and "." (not in rule names)
    if "download" not in _cfg:
        raise ValueError(f"config key datasets.{_ds}.download: required when datasets.{_ds}.source is 'download' "
                         f"(or set source: local when {_cfg['json']} and {_cfg['images']} are already in place)")

    rule:
        """Download (or link a local copy of) a real dataset's Karpathy JSON and images, verify sizes and digests."""
        name:
            f"download_{_name}"
        output:
            json=_cfg["json"],
            images=directory(_cfg["images"]),
            verified=f"resources/{_ds}/.verified",
        params:
            dataset=_ds,
            download=_cfg["download"],
            on_bad_image=ingest_options(_ds)["on_bad_image"],
            report=f"resources/{_ds}/bad_images.txt",
        threads: 2
        resources:
            mem_mb=2000,
            runtime=24 * 60,
        log:
            f"logs/download/{_ds}.log",
        conda:
            "../../envs/download.yaml"
        script:
            "../scripts/download_dataset.py"
