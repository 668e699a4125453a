"""gpud: node daemon for GPU clusters."""

__version__ = "0.1.0"
