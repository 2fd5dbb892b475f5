"""Torch-free core shared by training and serving: feature spec, ID mapping, bundles."""

import os

__version__ = "0.1.0"


def traceback_on() -> bool:
    """``CTR_TRACEBACK`` asks for tracebacks (anything but blank, 0, false, no, off).
    Here, standard library only: the Docker image's ops-build stage runs ``ctr.cli`` with
    this package's ``__init__``, ``cli``, ``cli_args`` and ``native`` modules alone, and
    no packages."""
    value = os.environ.get("CTR_TRACEBACK", "").strip().lower()
    return value not in ("", "0", "false", "no", "off")
