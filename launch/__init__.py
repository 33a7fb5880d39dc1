"""Thin absl entry points: train, plot, results, methods."""

import logging as std_logging
import os

from absl import logging

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OURS = tuple(os.path.join(_ROOT, package) + os.sep for package in ("l2t_jax", "launch"))


def _only_our_info(record) -> bool:
    """Keeps warnings from everyone but INFO lines only from this project (not orbax's)."""
    return record.levelno >= std_logging.WARNING or record.pathname.startswith(_OURS)


def quiet_library_logging() -> None:
    """Hides other libraries' INFO lines (orbax logs every checkpoint step)."""
    logging.get_absl_handler().python_handler.addFilter(_only_our_info)
