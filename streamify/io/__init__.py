"""Checkpoint input and output: sources, loading, artifact folders, manifests, model cards."""
