"""Builtin rewards (placeholder: being written)."""
