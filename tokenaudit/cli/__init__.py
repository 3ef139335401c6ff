"""The ``tokenaudit`` command line (click), one module per command group.

Each command is a thin shell over the module that does the work, imported inside the command
so ``tokenaudit kafka status`` does not load TensorFlow. Errors: every command lets the
project's errors (:class:`tokenaudit.errors.TokenauditError`) propagate; :mod:`.main`
catches them in one place and prints the message as one line (exit 1).
"""

from tokenaudit.cli.main import main

__all__ = ["main"]
