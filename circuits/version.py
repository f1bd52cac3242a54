"""The package's version, read from the installed distribution's metadata (pyproject.toml is the one source)."""

from __future__ import annotations

from importlib import metadata

DISTRIBUTION = "circuits-discovery"  # the name pip knows; the import name is `circuits`

try:
    __version__ = metadata.version(DISTRIBUTION)
except metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
