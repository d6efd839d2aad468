"""Evaluation: perplexity and the eval report."""
