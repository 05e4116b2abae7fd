"""GloVe text files (``word v1 … vD`` a line) → rows of an embedding matrix, with errors that name the config key,
the file, the line and the expected size.

The same reader as BSSAN's word vectors (``itmatch.models.bssan.load_glove``), with the config key a parameter so
that each model's message names its own key; SMFEA's concept embeddings (CVSE) use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch


def load_glove(path: str | Path, words: Sequence[str], weight: torch.Tensor, key: str, dim_key: str) -> int:
    """Copy the GloVe vector of every word of ``words`` found in ``path`` into row ``i`` of ``weight``
    [len(words), D]; returns how many rows were set.

    Errors: the file missing (``FileNotFoundError`` naming ``key`` and the path); a vector of a looked-up word
    with another size than D (``ValueError`` naming the file, the line, the size found and D with ``dim_key``);
    a value that is not a number. Lines of other words are not parsed (GloVe files hold odd tokens)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{key}: GloVe file {path} does not exist (set a GloVe text file, e.g. "
                                f"glove.840B.300d.txt, or null for a random init)")
    index = {w: i for i, w in enumerate(words)}
    dim = weight.shape[1]
    found = 0
    with open(path, encoding="utf-8") as fh, torch.no_grad():
        for n, line in enumerate(fh, 1):
            word, _, rest = line.rstrip("\n").partition(" ")
            i = index.get(word)
            if i is None:
                continue
            vals = rest.split(" ")
            if len(vals) != dim:
                raise ValueError(f"{path} line {n}: {len(vals)} values for {word!r}, the word vectors have {dim} "
                                 f"({dim_key}); expected lines 'word v1 … v{dim}'")
            try:
                weight[i] = torch.tensor([float(v) for v in vals], dtype=weight.dtype)
            except ValueError as e:
                raise ValueError(f"{path} line {n}: not a number in the vector of {word!r} ({e})") from None
            found += 1
    return found
