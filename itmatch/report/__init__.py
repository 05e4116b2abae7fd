"""Results table (ours next to the papers' published numbers), training curves, recall@K plots, PFAN figure."""
