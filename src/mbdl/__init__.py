"""mbdl: deep metric learning with the Margin-based Discriminate Loss (Sun, Tang, Bai, S+SSPR 2018)."""

__version__ = "0.1.0"

__all__ = ["__version__"]
