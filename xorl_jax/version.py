"""The package version (here, not in __init__, so modules that record it import no package-level code)."""

__version__ = "0.1.0"
