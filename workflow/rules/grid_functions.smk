# Helper functions of grid.smk (kept apart from its rules: `snakemake --lint`).

def _grid_weights(wc):
    """The VGG-19 weights file (grid.weights); unset is an error naming the key and the way out."""
    weights = config["grid"]["weights"]
    if not weights:
        raise ValueError(f"grid.weights is not set, but results/features/{wc.dataset}/grid.h5 is needed: BSSAN's "
                         f"W2R attends over the VGG-19 conv5_4 grid (models.bssan.w2r_input: grid, the default for "
                         f"coco / f30k). Set grid.weights to torchvision's ImageNet VGG-19 state dict "
                         f"(https://download.pytorch.org/models/vgg19-dcbb9e9d.pth), or use the bottom-up regions "
                         f"instead: models.bssan.datasets.{wc.dataset}.w2r_input: regions")
    return weights


def _grid_shard_output(path):
    return path if config["grid"]["keep_shards"] else temp(path)
