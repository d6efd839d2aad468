"""Model introspection: blocks, attention layout."""
