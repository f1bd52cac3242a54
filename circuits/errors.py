"""The package's one exception for bad input, so that users (and the CLI) can tell their mistakes from bugs."""

from __future__ import annotations


class CircuitsError(ValueError):
    """Bad input: a wrong argument, task, file or model. The message names the offending item.

    A ``ValueError`` subclass, so ``except ValueError`` keeps working. Anything else the package
    raises (a ``RuntimeError`` from torch, an ``AssertionError``) is a bug or an environment problem.
    """


class MissingDependency(CircuitsError, ImportError):
    """A package the asked-for feature needs is not installed; the message says how to install it."""
