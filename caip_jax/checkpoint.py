"""Orbax checkpoints of a CAIP run: `params`, `opt_state`, the data iterator (`data`), the
resolved `config`, the run's counters (`progress`) and the action normalisation statistics
(`action_stats`), one orbax item each, under WORKDIR/checkpoints/<step>/.

Items are separate so that readers take only what they need: the PyTorch export and the
evaluation restore `params` alone. Training restores a step whole or not at all
(`restore_run`): a step with a missing or unreadable item is reported by name and the step
before it is used, so a run never continues with a fresh optimizer or iterator by accident.
The one deliberate exception is a step written by an import (`save_import`: params and config,
marked as imported), from which `caip-train` starts with a new optimizer state and iterator.
Every process of a multi-host run calls the same methods; orbax coordinates the writes.
"""
import logging
import os
import time
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from etils import epath
from flax import traverse_util
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp
# No public names for these two (orbax 0.12.8); see MIN_REPLICA_SLICE_BYTES.
from orbax.checkpoint._src.metadata import array_metadata_store
from orbax.checkpoint._src.serialization import type_handler_registry
from orbax.checkpoint.checkpoint_managers import preservation_policy

from caip_jax import storage

PyTree = Any
# What a run needs to continue exactly; `restore_run` accepts no step without all of them.
RUN_ITEMS = ("params", "opt_state", "data", "config", "progress", "action_stats")
ITEMS = set(RUN_ITEMS)

# Orbax splits every replicated shard among its replicas ("replica-parallel"), each slice cut by
# its own device op. For a bias or a norm scale replicated over a pod's data axis the slices are
# a few bytes each, and their ops cost more than writing the shard whole from one replica; on
# the tests' 8 CPU devices they made each save of a tiny run 2.5 s (0.9 s without them). Only slices
# of at least this size are written replica-parallel: large replicated arrays still are.
MIN_REPLICA_SLICE_BYTES = 1 << 20
# orbax's public register_type_handler would log a warning at every start of every process.
type_handler_registry.GLOBAL_TYPE_HANDLER_REGISTRY.add(jax.Array, ocp.type_handlers.ArrayHandler(
    min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES,
    array_metadata_store=array_metadata_store.Store(),  # as orbax's default handler has it
), override=True, ignore_warnings=True)


class CheckpointMismatch(ValueError):
    """The checkpoint does not fit the config (another model): no earlier step would either."""


class UnusableStep(Exception):
    """A step that cannot be restored whole: an item missing, or its files unreadable."""


def _everywhere(ok: bool) -> bool:
    """True only if `ok` on every process, so that all fall back to the same step."""
    if jax.process_count() == 1:
        return ok
    return bool(multihost_utils.process_allgather(np.int32(ok)).all())


def _shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
    """Leaf paths ("['img']['embedding']['kernel']") -> shapes; a namedtuple field and the dict
    key orbax stores it under give the same path."""
    name = lambda key: repr(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))
    return {"".join(f"[{name(k)}]" for k in path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


class Checkpoints:
    """Saves and restores the items of a run under `workdir`/checkpoints, keeping the last `keep`."""

    def __init__(self, workdir: str, keep: int = 3, asynchronous: bool = True):
        if "://" not in workdir:  # gs:// and other remote paths are absolute already
            workdir = os.path.abspath(workdir)
        self.directory = os.path.join(workdir, "checkpoints")
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                preservation_policy=preservation_policy.LatestN(keep),
                enable_async_checkpointing=asynchronous,
                create=True,
            ),
            item_handlers=dict(
                params=ocp.StandardCheckpointHandler(),
                opt_state=ocp.StandardCheckpointHandler(),
                data=grain.checkpoint.CheckpointHandler(),
                config=ocp.JsonCheckpointHandler(),
                progress=ocp.JsonCheckpointHandler(),
                action_stats=ocp.JsonCheckpointHandler(),
            ),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def items(self, step: int) -> set[str]:
        """The items stored at `step`."""
        return {p.name for p in (epath.Path(self.directory) / str(step)).iterdir()} & ITEMS

    def check_shapes(self, step: int, item: str, abstract: PyTree) -> None:
        """Names every array whose shape differs between the checkpoint and `abstract`, before
        orbax would fail with a storage-level message."""
        metadata = self._manager.item_metadata(step)[item]
        if metadata is None:
            raise UnusableStep(f"step {step}: the metadata of {item!r} is missing or unreadable ({item}/_METADATA)")
        stored = _shapes(metadata.tree)
        wanted = _shapes(abstract)
        problems = [f"missing from the checkpoint: {k}" for k in wanted if k not in stored]
        problems += [f"not in the model: {k}" for k in stored if k not in wanted]
        problems += [
            f"{k}: checkpoint {stored[k]} vs model {shape}"
            for k, shape in wanted.items()
            if k in stored and stored[k] != shape
        ]
        if problems:
            raise CheckpointMismatch(
                f"The {item} of checkpoint step {step} in {self.directory} do not fit the config "
                f"(was it written with another model config?): " + "; ".join(problems)
            )

    def save(
        self,
        step: int,
        params: PyTree,
        opt_state: PyTree | None = None,
        data_iterator: Any = None,
        config: ml_collections.ConfigDict | None = None,
        progress: dict | None = None,
        action_stats: dict | None = None,
    ) -> None:
        """Starts saving (asynchronously unless disabled); `wait` blocks until it is on disk.
        `progress`: JSON counters of the run (e.g. samples seen per source); `action_stats`:
        the action normalisation the run trains with (JSON)."""
        args = dict(params=ocp.args.StandardSave(params))
        if opt_state is not None:
            args["opt_state"] = ocp.args.StandardSave(opt_state)
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if config is not None:
            args["config"] = ocp.args.JsonSave(config.to_dict())
        if progress is not None:
            args["progress"] = ocp.args.JsonSave(progress)
        if action_stats is not None:
            args["action_stats"] = ocp.args.JsonSave(action_stats)
        self._manager.save(step, args=ocp.args.Composite(**args), force=True)

    def save_import(self, params: PyTree, config: ml_collections.ConfigDict, source: str) -> None:
        """Step 0 of a new run from imported weights (`source`): params and config only, marked
        as imported, so that `restore_run` takes it as a start rather than an incomplete step."""
        if self.latest_step() is not None:
            raise ValueError(f"{self.directory} already holds step {self.latest_step()}: use a new workdir")
        self.save(0, params, config=config, progress=dict(imported_from=source))

    def restore(self, step: int, abstract_params: PyTree) -> dict[str, Any]:
        """`params` of `step` alone (a deliberate partial restore: evaluation, export, tests).

        The abstract tree (jax.ShapeDtypeStruct with shardings, e.g. from `jax.eval_shape`)
        says where each array goes: a checkpoint restores onto any mesh. A tree whose shapes
        differ from the checkpoint's is refused, naming the array.
        """
        self.check_shapes(step, "params", abstract_params)
        args = ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params))
        return {"params": self._manager.restore(step, args=args)["params"]}

    def restore_run(
        self, abstract_params: PyTree, abstract_opt_state: PyTree, data_iterator: Any, data_workers: int
    ) -> tuple[int, dict[str, Any]] | None:
        """The newest step that restores whole: (step, items), or None if there is no step.

        Steps are tried newest first. A step lacking one of RUN_ITEMS, or whose files cannot be
        read (a truncated array, a deleted _METADATA), is reported with a warning naming the
        step and why, and the step before it is tried. A step written by `save_import` gives
        only `params` and `progress` (with `imported_from`). A checkpoint of another model
        shape, or whose iterator ran another number of loader processes than `data_workers`,
        raises CheckpointMismatch at once. Raises RuntimeError if no step is usable. A failure
        that may pass (storage.is_transient: a dropped connection, a 503) is retried with backoff
        and then raised as StorageError: an outage is not lost data, and falling back would
        silently throw away the newest steps' work.
        """
        steps = sorted(self._manager.all_steps(), reverse=True)
        problems = []
        for step in steps:
            try:
                restored = storage.retry(
                    lambda: self._restore_whole(step, abstract_params, abstract_opt_state, data_iterator, data_workers),
                    f"restoring checkpoint step {step} of {self.directory}",
                )
                reason = ""
            except (CheckpointMismatch, MemoryError):
                raise
            except Exception as error:  # noqa: BLE001 -- any unreadable item makes the step unusable...
                if storage.is_transient(error):  # ...but not a storage outage: the step may be whole
                    raise storage.StorageError(
                        f"checkpoint step {step} of {self.directory} could not be read ({type(error).__name__}: "
                        f"{str(error).splitlines()[0][:300]}), a storage error that persisted through retries; the "
                        "step is kept: run again once the storage answers"
                    ) from error
                restored, reason = None, f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
            if _everywhere(restored is not None):
                if problems:
                    logging.warning("restored step %d of %s instead (newer steps unusable: %s)", step, self.directory, "; ".join(problems))
                    self._set_aside(steps[: len(problems)])
                return step, restored
            reason = reason or "unreadable on another process"
            logging.warning("checkpoint step %d in %s cannot be restored (%s); trying the step before", step, self.directory, reason)
            problems.append(f"step {step}: {reason}")
        if problems:
            raise RuntimeError(
                f"no checkpoint step in {self.directory} can be restored whole: " + "; ".join(problems)
                + ". Restore the files, or move the directory away to start the run afresh"
            )
        return None

    def _set_aside(self, steps: list[int]) -> None:
        """Moves unusable steps to WORKDIR/unusable_checkpoints/ (kept for inspection, not lost),
        so that the run can write those step numbers again."""
        aside = storage.join(os.path.dirname(self.directory), "unusable_checkpoints")
        if jax.process_index() == 0:
            for step in steps:
                target = storage.join(aside, f"{step}.{int(time.time())}")
                storage.move(storage.join(self.directory, str(step)), target)
                logging.warning("moved the unusable checkpoint step %d to %s", step, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("caip_jax.checkpoint: unusable steps set aside")
        self._manager.reload()

    def _restore_whole(self, step, abstract_params, abstract_opt_state, data_iterator, data_workers) -> dict[str, Any]:
        stored = self.items(step)
        progress = self.restore_json(step, "progress") or {}
        if "imported_from" in progress:
            return dict(self.restore(step, abstract_params), progress=progress)
        missing = [item for item in RUN_ITEMS if item not in stored]
        if missing:
            raise UnusableStep(f"incomplete, no {', '.join(missing)}")
        self.check_shapes(step, "params", abstract_params)
        self.check_shapes(step, "opt_state", abstract_opt_state)
        config = self.restore_json(step, "config")
        # grain's iterator state holds one state per loader process (none with 0), so it restores
        # only into an iterator with as many; grain's own error would make the step look unusable.
        saved_workers = config.get("data", {}).get("workers", data_workers)
        if saved_workers != data_workers:
            raise CheckpointMismatch(
                f"step {step} in {self.directory} holds the data iterator of data.workers={saved_workers}, the "
                f"config has data.workers={data_workers}: the iterator's state is per loader process, so resume "
                f"with --config.data.workers={saved_workers}"
            )
        args = ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params),
            opt_state=ocp.args.StandardRestore(abstract_opt_state),
            data=grain.checkpoint.CheckpointRestore(data_iterator),
            action_stats=ocp.args.JsonRestore(),
        )
        restored = self._manager.restore(step, args=args)
        return dict({name: restored[name] for name in ("params", "opt_state", "data", "action_stats")}, config=config, progress=progress)

    def param_metadata(self, step: int) -> dict[str, Any]:
        """Flat parameter names ('img/embedding/kernel') -> orbax metadata (.shape, .dtype),
        without reading any array."""
        return traverse_util.flatten_dict(self._manager.item_metadata(step)["params"].tree, sep="/")

    def read_params(self, step: int, names: list[str]) -> dict[str, np.ndarray]:
        """The parameters `names` (flat, as `param_metadata` gives them) of `step`, as numpy
        arrays in this process, whatever mesh wrote them; the others are not read, so a reader
        can go through a large model a few tensors at a time."""
        wanted = traverse_util.unflatten_dict({tuple(n.split("/")): 0 for n in names})
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
        restored = ocp.PyTreeCheckpointer().restore(
            epath.Path(self.directory) / str(step) / "params",
            args=ocp.args.PyTreeRestore(item=wanted, restore_args=restore_args, partial_restore=True),
        )
        return traverse_util.flatten_dict(restored, sep="/")

    def restore_json(self, step: int, item: str) -> dict | None:
        """The JSON item `item` (config, progress, action_stats) of `step`, or None if absent."""
        if item not in self.items(step):
            return None
        return self._manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]

    def restore_config(self, step: int) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict(self.restore_json(step, "config"))

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
