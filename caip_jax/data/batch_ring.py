"""Batches from loader processes to the trainer through reused shared memory.

grain ships each batch a worker process makes in a new shared-memory block, which the kernel
must allocate and zero page by page and the trainer must map: on the benchmark machine 5.6 ms
for a 7.3 MB batch, a fifth of a sample's host CPU (benchmarks/RESULTS.md). Here each worker
process writes its batches into a ring of `SLOTS` slots of one shared file instead, made once
and reused, and sends grain only where they lie; the trainer copies each batch out and
acknowledges it. The arrays the trainer gets are its own: no slot is ever handed out.

    worker:  stamp n (its n-th batch) -> slot n % SLOTS, once the trainer has taken stamp
             n - SLOTS (or skipped it: grain drops batches in flight on `set_state`)
    trainer: copy stamp n out of its slot, then write n into the ring's header

The header holds the last stamp the trainer took. Each worker's batches reach the trainer in
stamp order, so every stamp up to it was taken or dropped: its slot is free. The acknowledgement
is a pwrite (a system call, so the copy's reads are complete before it is seen) and the worker
overwrites a slot only after reading it. `SLOTS` exceeds the batches one worker can have in
flight (grain's queue, its interleave buffer, the one being sent, the one being copied), so a
worker waits on grain's bounded queue, not on a slot, and batches dropped by `set_state`
cannot fill the ring. Only numeric arrays go through the ring; other leaves, and a batch
larger than the first (the slot size), go through grain unchanged. Memory: SLOTS batches per
worker process, in /dev/shm.

Nothing outlives a trainer killed by SIGKILL: each worker's watchdog thread (`exit_with_trainer`)
ends the worker once its parent is gone and removes the rings; multiprocessing's resource
tracker then sees its pipe close and exits too. The rings' directory is named by its owner
(pid and start time), and a trainer removes the directories of owners that are gone when it
makes its own, in case the workers died with their trainer (a whole process group killed).
"""
import dataclasses
import logging
import mmap
import os
import re
import shutil
import struct
import tempfile
import threading
import time
import uuid
import weakref

import numpy as np

SLOTS = 8  # twice the most batches one worker had in flight with grain 0.2.18 (4, measured)
_HEADER = 4096  # the acknowledged stamp (int64), then the slots, each page-aligned
_ALIGN = 64
_WAIT_WARNING_SECONDS = 60.0
_PARENT_POLL_SECONDS = 0.2
_PREFIX = "caip-batches-"


@dataclasses.dataclass(frozen=True)
class RingBatch:
    """What grain carries for one batch: where its arrays lie, and the leaves that do not."""

    path: str
    stamp: int
    arrays: dict  # key -> (byte offset in the ring file, shape, dtype string)
    others: dict


def _ring_leaf(value) -> bool:
    return isinstance(value, np.ndarray) and value.dtype.kind in "biufc" and value.size > 0


def _aligned(nbytes: int, alignment: int) -> int:
    return -(-nbytes // alignment) * alignment


def make_directory() -> str:
    """A fresh directory for one iterator's rings, in /dev/shm (memory) where there is one,
    named by this process (`_owner`); first removes the rings of owners that are gone."""
    root = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    owner = _owner(os.getpid())
    if owner is not None:  # Linux (/proc): owners can be told apart from reused pids
        remove_orphans(root)
    return tempfile.mkdtemp(prefix=f"{_PREFIX}{owner or os.getpid()}-", dir=root)


def remove_orphans(root: str) -> list[str]:
    """Removes the ring directories under `root` whose owner is gone; returns them."""
    removed = []
    for name in os.listdir(root):
        match = re.fullmatch(rf"{_PREFIX}((\d+)\.\d+)-\w+", name)
        if match and _owner(int(match[2])) != match[1]:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            removed.append(name)
    return removed


def _owner(pid: int) -> str | None:
    """"PID.START" of a live process (START: its start time in clock ticks since boot, so a pid
    the kernel gives to a later process names another owner); None if it is gone or there is no
    /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f"{pid}.{f.read().rsplit(')', 1)[1].split()[19]}"  # field 22, after "pid (comm)"
    except (FileNotFoundError, ProcessLookupError):
        return None


def exit_with_trainer(trainer: int, rings: str, worker_index: int, worker_count: int) -> None:
    """grain's worker_init_fn: a daemon thread ends this loader process, removing `rings`, as
    soon as its parent `trainer` is gone (SIGKILL included: then no clean-up of the trainer's
    runs). Not prctl's PR_SET_PDEATHSIG: it fires when the *thread* that started the worker ends,
    and grain starts workers from threads of its own."""
    del worker_index, worker_count

    def watch():
        while os.getppid() == trainer:
            time.sleep(_PARENT_POLL_SECONDS)
        shutil.rmtree(rings, ignore_errors=True)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-trainer", daemon=True).start()


class RingWriter:
    """grain map function for the worker side: a batch (a dict of arrays) -> a RingBatch.
    Pickled into each worker process without state; the ring is made on the first batch.
    Stamps assume one batch at a time, in order: an IterDataset map runs in the thread that
    consumes it (the worker's main thread), after the loader threads."""

    def __init__(self, directory: str):
        self.directory = directory
        self._ring = None

    def __getstate__(self):
        return dict(directory=self.directory)

    def __setstate__(self, state):
        self.__init__(state["directory"])

    def __call__(self, batch: dict):
        arrays = {k: np.ascontiguousarray(v) for k, v in batch.items() if _ring_leaf(v)}
        needed = sum(_aligned(v.nbytes, _ALIGN) for v in arrays.values())
        if self._ring is None:
            self._ring = _Ring.create(self.directory, _aligned(needed, mmap.PAGESIZE))
        ring = self._ring
        if needed > ring.slot_bytes:
            logging.warning("a batch of %s is larger than the first; it goes through grain's own "
                            "shared memory", {k: v.shape for k, v in arrays.items()})
            return batch
        stamp, ring.stamps = ring.stamps, ring.stamps + 1
        ring.wait_until_taken(stamp - SLOTS)
        offset, places = _HEADER + (stamp % SLOTS) * ring.slot_bytes, {}
        for key, value in arrays.items():
            np.ndarray(value.shape, value.dtype, ring.buffer, offset)[...] = value
            places[key] = (offset, value.shape, value.dtype.str)
            offset += _aligned(value.nbytes, _ALIGN)
        return RingBatch(ring.path, stamp, places, {k: v for k, v in batch.items() if k not in arrays})


class RingReader:
    """grain map function for the trainer side: a RingBatch -> the batch, copied out of its
    slot, and the slot acknowledged. Removes the rings' directory when it is collected."""

    def __init__(self, directory: str):
        self._files: dict[str, tuple[int, mmap.mmap]] = {}
        self._finalizer = weakref.finalize(self, _close, self._files, directory)

    def __call__(self, element):
        if not isinstance(element, RingBatch):
            return element
        if element.path not in self._files:
            fd = os.open(element.path, os.O_RDWR)
            self._files[element.path] = (fd, mmap.mmap(fd, 0))
        fd, buffer = self._files[element.path]
        batch = {key: np.array(np.ndarray(shape, dtype, buffer, offset))
                 for key, (offset, shape, dtype) in element.arrays.items()}
        os.pwrite(fd, struct.pack("<q", element.stamp), 0)
        return dict(batch, **element.others)


def _close(files: dict, directory: str) -> None:
    for fd, buffer in files.values():
        buffer.close()
        os.close(fd)
    shutil.rmtree(directory, ignore_errors=True)


class _Ring:
    """One worker's ring file, mapped."""

    def __init__(self, path: str, buffer: mmap.mmap, slot_bytes: int):
        self.path, self.buffer, self.slot_bytes, self.stamps = path, buffer, slot_bytes, 0

    @classmethod
    def create(cls, directory: str, slot_bytes: int) -> "_Ring":
        path = os.path.join(directory, f"ring-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, _HEADER + SLOTS * slot_bytes)
            os.pwrite(fd, struct.pack("<q", -1), 0)
            return cls(path, mmap.mmap(fd, 0), slot_bytes)
        finally:
            os.close(fd)  # the mapping keeps the file

    def taken(self) -> int:
        return struct.unpack_from("<q", self.buffer, 0)[0]

    def wait_until_taken(self, stamp: int) -> None:
        start = warned = time.monotonic()
        while self.taken() < stamp:  # exit_with_trainer ends this if the trainer has gone
            time.sleep(0.0002)
            if time.monotonic() - warned > _WAIT_WARNING_SECONDS:
                warned = time.monotonic()
                logging.warning("loader worker %d has waited %.0f s for the trainer to take batch %d "
                                "of its ring of %d", os.getpid(), warned - start, stamp, SLOTS)
