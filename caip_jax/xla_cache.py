"""The persistent compilation cache: compiled programs kept across restarts, so that a job resumed
after preemption loads its step instead of compiling it again (minutes at pod scale)."""
import logging
import time

import jax
from etils import epath
# JAX's own reader of its cache entries (no public API has one): whatever compression JAX wrote
# with, this reads, so a readable entry is never taken for a broken one.
from jax._src.compilation_cache import decompress_executable
from jax.experimental.compilation_cache import compilation_cache

from caip_jax import storage

ENTRY_SUFFIX, ATIME_SUFFIX = "-cache", "-atime"  # jax._src.lru_cache's file names


def use(path: str) -> None:
    """Compiled programs persist in `path` ("" turns the cache off; a local or gs:// path).
    Entries that a killed writer left cut short are removed first (see `remove_unreadable`)."""
    if not path:
        return
    # Object storage uploads an entry whole or not at all, so nothing there is cut short; checking
    # would download and decompress every entry at every start.
    if jax.process_index() == 0 and not storage.is_remote(path):  # process 0: the only one JAX lets write
        remove_unreadable(path)
    if jax.config.jax_compilation_cache_dir != path:
        compilation_cache.set_cache_dir(path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # every program: none recompiles
        compilation_cache.reset_cache()  # the cache binds its directory once per process


def remove_unreadable(path: str) -> list[str]:
    """Removes the entries under `path` that do not decompress, and returns their names. JAX
    writes an entry in place, so a process killed mid-write leaves it cut short; JAX then warns
    and compiles that program at every start, and never writes it again (it keeps an existing
    file). Removed, the entry is written again by the next compile."""
    start, entries, removed = time.perf_counter(), sorted(epath.Path(path).glob(f"*{ENTRY_SUFFIX}")), []
    for entry in entries:
        try:
            decompress_executable(entry.read_bytes())
        except Exception as error:  # zstd's or zlib's error, whichever JAX compressed with
            logging.warning("compilation cache: removing %s, which does not read (%s: %s; a writer killed "
                            "mid-write?): its program compiles once more and is written again",
                            entry, type(error).__name__, error)
            entry.unlink(missing_ok=True)
            (entry.parent / (entry.name.removesuffix(ENTRY_SUFFIX) + ATIME_SUFFIX)).unlink(missing_ok=True)
            removed.append(entry.name)
    if entries:
        logging.info("compilation cache %s: %d entries checked in %.1f s, %d removed",
                     path, len(entries), time.perf_counter() - start, len(removed))
    return removed
