"""Thin command-line entry points: flags in, library calls out.

Importing this package (every tool does, before JAX starts) tells JAX its platforms on a host
without a TPU, and `run_tool` ends a failed tool with one line naming the cause and the fix."""
import glob
import importlib.util
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags


def tpu_on_this_host() -> bool:
    """A PCI device of Google's vendor id (0x1ae0): how JAX itself tells a TPU VM."""
    for path in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(path) as f:
                if f.read().strip() == "0x1ae0":
                    return True
        except OSError:
            continue
    return False


def choose_platforms() -> None:
    """libtpu (the test extra installs it, for caip-compile) makes JAX probe for a TPU at every
    start, and on a host without one it prints a screen of errors (host bounds, InitGoogle,
    TPU_WORKER_HOSTNAMES). There, JAX is told the platforms it has: CUDA (with its plugin and a
    driver) and the CPU. A JAX_PLATFORMS set by the user wins; caip-compile loads libtpu itself."""
    if "JAX_PLATFORMS" in os.environ or tpu_on_this_host():
        return
    cuda = os.path.exists("/dev/nvidiactl") and any(
        importlib.util.find_spec(name) for name in ("jax_cuda12_plugin", "jax_cuda13_plugin"))
    os.environ["JAX_PLATFORMS"] = "cuda,cpu" if cuda else "cpu"
    if "jax" in sys.modules:  # read at import: too late for the environment alone
        sys.modules["jax"].config.update("jax_platforms", os.environ["JAX_PLATFORMS"])


choose_platforms()
flags.DEFINE_bool("traceback", False, "On an error, show Python's traceback, not only the one-line message.")
# Errors whose messages this code writes to name the cause and the fix; any other is a bug or
# an environment's fault, so its one line adds where to look.
EXPECTED_ERRORS = (ValueError, RuntimeError, OSError)


def one_line(error: BaseException) -> str:
    """`error` as one line: its message's lines joined, its type where the message is not ours."""
    text = "; ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
    if not isinstance(error, EXPECTED_ERRORS):
        text = f"{type(error).__name__}: {text} (a bug? run again with --traceback to see where)"
    return text


def run_tool(main, flags_parser=None) -> None:
    """absl's app.run(main) for the tool of `main`'s module: an error ends the run with exit 1
    and one line, `caip-TOOL: cause and fix`, unless --traceback or --verbosity asks for more."""
    module = getattr(sys.modules[main.__module__].__spec__, "name", main.__module__).split(".")[-1]  # python -m: __main__
    command = "caip-" + {"inspect_records": "inspect"}.get(module, module).replace("_", "-")

    def main_one_line(argv):
        try:
            return main(argv)
        except Exception as error:
            if flags.FLAGS.traceback or flags.FLAGS["verbosity"].present:
                raise
            sys.exit(f"{command}: {one_line(error)}")

    app.run(main_one_line, **({"flags_parser": flags_parser} if flags_parser else {}))


def quiet_unless_asked() -> None:
    """Warnings and errors only, unless --verbosity was given: orbax logs every checkpoint
    read and write at INFO, which would bury a tool's own output."""
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)


def check_storage(reads: dict[str, str] = None, writes: dict[str, str] = None) -> None:
    """Before any work: each path of `reads` (flag -> path; empty ones skipped) must exist and each
    of `writes` be writable, local or remote (caip_jax.storage.check_access); else exit 1 with one
    line naming the flag, the path and the fix (storage.StorageError, through `run_tool`), within
    seconds rather than after the work."""
    from caip_jax import storage

    for what, path in (reads or {}).items():
        if path:
            storage.check_access(path, what=what)
    for what, path in (writes or {}).items():
        if path:
            storage.check_access(path, write=True, what=what)


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
