"""Orbax checkpoints of a CAIP run: `params`, `opt_state`, the data iterator (`data`) and the
resolved `config`, one orbax item each, under WORKDIR/checkpoints/<step>/.

Items are separate so that readers take only what they need: the PyTorch export and the
evaluation restore `params` alone, and a checkpoint written by `caip-import-siglip2` (step 0,
params and config only) is a valid start for `caip-train`, which then creates the optimizer
state. Every process of a multi-host run calls the same methods; orbax coordinates the writes.
"""
import os
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from etils import epath
from flax import traverse_util
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy

PyTree = Any
ITEMS = {"params", "opt_state", "data", "config", "progress"}


def _shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
    return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


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
        stored = _shapes(self._manager.item_metadata(step)[item].tree)
        wanted = _shapes(abstract)
        problems = [f"missing from the checkpoint: {k}" for k in wanted if k not in stored]
        problems += [f"not in the model: {k}" for k in stored if k not in wanted]
        problems += [
            f"{k}: checkpoint {stored[k]} vs model {shape}"
            for k, shape in wanted.items()
            if k in stored and stored[k] != shape
        ]
        if problems:
            raise ValueError(
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
    ) -> None:
        """Starts saving (asynchronously unless disabled); `wait` blocks until it is on disk.
        `progress`: JSON counters of the run (e.g. samples seen per source)."""
        args = dict(params=ocp.args.StandardSave(params))
        if opt_state is not None:
            args["opt_state"] = ocp.args.StandardSave(opt_state)
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if config is not None:
            args["config"] = ocp.args.JsonSave(config.to_dict())
        if progress is not None:
            args["progress"] = ocp.args.JsonSave(progress)
        self._manager.save(step, args=ocp.args.Composite(**args), force=True)

    def restore(
        self,
        step: int,
        abstract_params: PyTree,
        abstract_opt_state: PyTree | None = None,
        data_iterator: Any = None,
    ) -> dict[str, Any]:
        """Restores `params` (and `opt_state`, and the iterator in place, when given; and
        `progress` if stored) at `step`.

        The abstract trees (jax.ShapeDtypeStruct with shardings, e.g. from `jax.eval_shape`)
        say where each array goes: a checkpoint restores onto any mesh. A tree whose shapes
        differ from the checkpoint's is refused by orbax, naming the array.
        """
        stored = self.items(step)
        self.check_shapes(step, "params", abstract_params)
        args = dict(params=ocp.args.StandardRestore(abstract_params))
        if abstract_opt_state is not None and "opt_state" in stored:
            args["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
        if data_iterator is not None and "data" in stored:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        if "progress" in stored:
            args["progress"] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        return {name: restored[name] for name in args}

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

    def restore_config(self, step: int) -> ml_collections.ConfigDict:
        restored = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return ml_collections.ConfigDict(restored["config"])

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
