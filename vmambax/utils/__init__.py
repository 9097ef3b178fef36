"""Small helpers for the vmambax engine and CLI."""
