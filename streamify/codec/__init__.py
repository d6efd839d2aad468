"""Lossless entropy coding of weights: the codec, the container format, loading, restoring, the stage."""
