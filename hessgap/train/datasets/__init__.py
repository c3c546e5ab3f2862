"""Readers for the on-disk and built-in data formats hessgap trains on (one module per format)."""
