"""Thin command-line entry points: flags in, library calls out."""
