"""The ``skewless`` command line: a thin shell over the library (heavy imports are lazy)."""

from runtime.cli._app import app, main

__all__ = ["app", "main"]
