"""itmatch: a reproducible image-text matching pipeline (ingest → regions → text → models → metrics)."""

__version__ = "0.1.0"
