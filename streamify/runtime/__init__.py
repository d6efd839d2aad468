"""Streaming inference: sink + window attention, a bounded cache, chunked feeding and generation."""

from streamify.runtime.attention import disable_streaming, enable_streaming
from streamify.runtime.cache import StreamingCache, new_cache
from streamify.runtime.spec import StreamingSpec, make_spec, read_spec

__all__ = [
    "StreamingCache",
    "StreamingSpec",
    "disable_streaming",
    "enable_streaming",
    "make_spec",
    "new_cache",
    "read_spec",
]
