"""Small shared helpers: atomic file output, logging for workflow jobs, hashing."""
