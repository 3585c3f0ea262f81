"""The ``maeformer`` command line: the only argparse in the package, one module per command group."""

from .main import main

__all__ = ["main"]
