"""Thin command-line entry points: flags in, library calls out."""

from absl import flags
from absl import logging as absl_logging


def quiet_unless_asked() -> None:
    """Warnings and errors only, unless --verbosity was given: orbax logs every checkpoint
    read and write at INFO, which would bury a tool's own output."""
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
