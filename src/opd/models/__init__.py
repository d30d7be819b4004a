"""Backends: anything that can score (and generate) sequences."""
