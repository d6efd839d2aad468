"""Quantization: INT4 weights (``streamify.quantize.int4``); lossless coding is ``streamify.codec``."""
