"""Data the project generates itself (no downloads)."""
