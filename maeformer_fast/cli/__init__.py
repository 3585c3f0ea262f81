"""The ``maeformer`` command line: the only argparse in the package, one module per command group
(``main``: the ``maeformer`` entry point and the training, prediction and bench commands; ``data``,
``study``: their command groups; ``args``: options from dataclasses; ``info``: the environment report)."""
