"""Thin command-line entry points: flags in, library calls out."""
import importlib.util
import sys

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags


def quiet_unless_asked() -> None:
    """Warnings and errors only, unless --verbosity was given: orbax logs every checkpoint
    read and write at INFO, which would bury a tool's own output."""
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, except that an override of a field the config lacks
    (`--config.model.foo=1`) is a one-line error with the field's path and the closest names,
    not ml_collections' bare AttributeError."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, TypeError):  # what ml_collections raises for a path it cannot follow
        problem = unknown_override(argv, _config_path(argv, flags.FLAGS["config"].default_as_str.strip("'")))
        if not problem:
            raise
        sys.exit(f"FATAL Flags parsing error: {problem}")


def define_config_file_with_default(default: str, help_string: str, **kwargs) -> None:
    """`--config`, a config file defaulting to `default`. For such a flag ml_collections applies
    the `--config.*` overrides of sys.argv when the flag is defined, before `parse_flags` could
    catch a field the config lacks; so that is refused here first, with the same one-line error."""
    problem = unknown_override(sys.argv, _config_path(sys.argv, default))
    if problem:
        sys.exit(f"FATAL Flags parsing error: {problem}")
    config_flags.DEFINE_config_file("config", default, help_string, **kwargs)


def unknown_override(argv: list[str], config_path: str) -> str | None:
    """The message of the first `--config.PATH=...` in argv naming no field of the config file."""
    from caip_jax.config import unknown_field

    config = _load_config(config_path)
    overrides = [a[len("--config."):].split("=")[0] for a in argv if a.startswith("--config.")]
    return next(filter(None, (unknown_field(config, path) for path in overrides)), None)


def _load_config(path: str):
    spec = importlib.util.spec_from_file_location("config_file", path.split(":")[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _config_path(argv: list[str], default: str) -> str:
    """The --config file as given, or `default`, before the flags are parsed."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return default
