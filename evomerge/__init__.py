"""evomerge: evolutionary merge search."""

__version__ = "0.1.0"
