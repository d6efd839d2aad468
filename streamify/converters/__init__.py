"""Conversions: dtype casts (streaming conversions join here)."""
