"""The distribution's version: the one place it is written (pyproject reads it dynamically)."""

__version__ = "0.1.0"
