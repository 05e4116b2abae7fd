"""Reading ``captions.parquet`` for the text stages (kept apart from the tokenizer, so that stages which only
read captions do not depend on its code)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def read_captions(path: str | Path) -> pd.DataFrame:
    """``captions.parquet`` with a clear error when a contract column is missing."""
    df = pd.read_parquet(path)
    missing = [c for c in ("caption_id", "image_id", "split", "text") if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)} (see docs/contract.md)")
    bad = df["text"].isna()
    if bad.any():
        raise ValueError(f"{path}: caption_id {int(df['caption_id'][bad].iloc[0])} has no text")
    return df
