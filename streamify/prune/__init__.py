"""Depth pruning: score blocks, remove them, re-initialise neighbours, replace spans, heal."""
