"""Quantization and compression stages: lossless entropy coding (INT4 follows)."""
