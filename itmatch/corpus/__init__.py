"""The corpus room: reading a dataset's artifacts (images, captions, regions, blocks, tags, BERT, trees, tokens)
for any consumer — training, evaluation, reports — and writing small synthetic corpora for tests and benchmarks."""
