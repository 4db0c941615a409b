"""Orbax checkpoints of training runs, the params-only format of converted weights, and preemption.

A run's checkpoints live in `<workdir>/checkpoints/<step>/` with three items:
  state/   the train state (`step`, `params`, `opt_state`) as sharded arrays (restorable onto any mesh)
  data/    each process's data-iterator state, `process_<i>-of-<n>.json`
  config/  the run's config as JSON (for the record; the command line stays authoritative)

Converted weights (`--config.init_from=DIR`) are a params-only checkpoint written by `save_params`:
an Orbax PyTree checkpoint of the plain params dict, `{component: subtree}` with components from
`emu2_jax.models.emu2.COMPONENTS` (any subset), laid out exactly like `Emu2Model`'s params.
`load_params` also accepts a training workdir (or its `checkpoints/` folder): its latest step's params.
"""
from __future__ import annotations

import json
import signal
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

PyTree = Any
CHECKPOINTS = "checkpoints"
_ITEMS = ("state", "data", "config")


def create_manager(workdir: str | epath.Path, *, save_every_steps: int, keep: int,
                   async_save: bool = True) -> ocp.CheckpointManager:
    """A manager saving every `save_every_steps` steps (and on preemption), keeping the last `keep`."""
    data_file = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        # Multiples of save_every_steps and preemptions only (no save at a run's first step).
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(save_every_steps), policies.PreemptionCheckpointingPolicy()]),
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        create=True,
    )
    handlers = {
        "state": ocp.StandardCheckpointHandler(),
        # Every process writes its own iterator state (primary_host=None: no single writer).
        "data": ocp.JsonCheckpointHandler(
            filename=data_file, multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=None)),
        "config": ocp.JsonCheckpointHandler(filename="config.json"),
    }
    return ocp.CheckpointManager(epath.Path(workdir) / CHECKPOINTS, options=options, item_names=_ITEMS,
                                 item_handlers=handlers)


def save_checkpoint(manager: ocp.CheckpointManager, step: int, state: PyTree, data_state: Mapping[str, Any],
                    config: ml_collections.ConfigDict, *, force: bool = False) -> bool:
    """Starts an (async) save of step `step`; returns whether one was started."""
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(dict(data_state)),
        config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
    )
    return manager.save(step, args=args, force=force)


def restore_checkpoint(manager: ocp.CheckpointManager, step: int, abstract_state: PyTree
                       ) -> tuple[PyTree, dict[str, Any]]:
    """(state, this process's data-iterator state) of `step`.

    abstract_state: `jax.ShapeDtypeStruct`s with the shardings wanted now; the saved arrays are
    resharded onto them, so the mesh may differ from the one that saved.
    """
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored.state, restored.data


def abstract_like(tree: PyTree, shardings: PyTree) -> PyTree:
    """ShapeDtypeStructs of `tree`'s leaves (arrays or shape structs) with the given shardings."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# ---------------------------------------------------------------------------------------------
# Params-only checkpoints: converted weights and `init_from`.


def save_params(directory: str | epath.Path, params: Mapping[str, Any]) -> None:
    """Writes the `init_from` format: an Orbax PyTree checkpoint of `{component: subtree}`."""
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(epath.Path(directory).absolute(), dict(params))
    checkpointer.wait_until_finished()


def _params_source(path: epath.Path) -> tuple[epath.Path, tuple[str, ...]]:
    """(directory of a PyTree checkpoint, key path of the params inside it) for `init_from`."""
    manager_dir = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    steps = [int(p.name) for p in manager_dir.iterdir() if p.name.isdigit() and (p / "state").is_dir()]
    if steps:
        return manager_dir / str(max(steps)) / "state", ("params",)
    return path, ()


def _resize_pos_embed(table: jax.Array, num_positions: int) -> jax.Array:
    """[1, 1 + g*g, D] -> [1, num_positions, D]: bicubic resize of the patch grid, CLS kept."""
    old_grid, new_grid = int(round((table.shape[1] - 1) ** 0.5)), int(round((num_positions - 1) ** 0.5))
    if old_grid ** 2 + 1 != table.shape[1] or new_grid ** 2 + 1 != num_positions:
        raise ValueError(f"pos_embed {table.shape} -> {num_positions} positions: not a CLS + square grid")
    grid = table[0, 1:].reshape(old_grid, old_grid, -1).astype(jnp.float32)
    grid = jax.image.resize(grid, (new_grid, new_grid, grid.shape[-1]), method="bicubic")
    return jnp.concatenate([table[:, :1], grid.reshape(1, new_grid ** 2, -1).astype(table.dtype)], axis=1)


def load_params(path: str, abstract_params: Mapping[str, Any], components: Sequence[str]) -> dict[str, Any]:
    """Restores the given top-level components of a params-only checkpoint (or of a training run).

    abstract_params: the model's params as ShapeDtypeStructs with shardings; the returned subtrees
    follow them. A vision position table saved for another resolution (Emu2 stage 1 at 224 px, then
    448 px) is resized; any other shape difference is an error naming the parameter.
    """
    directory, prefix = _params_source(epath.Path(path).absolute())
    checkpointer = ocp.PyTreeCheckpointer()
    saved = checkpointer.metadata(directory)
    saved = getattr(saved, "item_metadata", saved)
    saved = getattr(saved, "tree", saved)
    for key in prefix:
        saved = saved[key]
    missing = [c for c in components if c not in saved]
    if missing:
        raise ValueError(f"init_from={path}: no component(s) {missing} in the checkpoint (has {sorted(saved)}); "
                         f"choose the ones to load with --config.init_components")

    wanted = {c: abstract_params[c] for c in components}
    resized: dict[tuple, jax.ShapeDtypeStruct] = {}

    def target(path_keys, want):
        keys = tuple(k.key for k in path_keys)
        have = saved
        for k in keys:
            if k not in have:
                raise ValueError(f"init_from={path}: parameter {'/'.join(keys)} is missing in the checkpoint")
            have = have[k]
        if tuple(have.shape) == tuple(want.shape):
            return want
        if keys[-1] == "pos_embed":
            resized[keys] = want
            replicated = jax.sharding.NamedSharding(want.sharding.mesh, jax.sharding.PartitionSpec())
            return jax.ShapeDtypeStruct(tuple(have.shape), want.dtype, sharding=replicated)
        raise ValueError(f"init_from={path}: parameter {'/'.join(keys)} has shape {tuple(have.shape)} in "
                         f"the checkpoint, the model expects {tuple(want.shape)}")

    item = jax.tree_util.tree_map_with_path(target, wanted)
    for key in reversed(prefix):
        item = {key: item}
    restored = checkpointer.restore(directory, args=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
    for key in prefix:
        restored = restored[key]
    for keys, want in resized.items():
        node = restored
        for k in keys[:-1]:
            node = node[k]
        logging.info("init_from: resizing %s %s -> %s", "/".join(keys), node[keys[-1]].shape, want.shape)
        node[keys[-1]] = jax.device_put(_resize_pos_embed(node[keys[-1]], want.shape[1]), want.sharding)
    return restored


# ---------------------------------------------------------------------------------------------
# Preemption.


class PreemptionWatcher:
    """Turns SIGTERM (a preemption notice) into a final checkpoint and a clean exit.

    Single process: a SIGTERM handler sets a flag. Multi-process: every host must agree on the
    step, so Orbax's preemption sync point (the JAX coordination service) decides instead.
    """

    def __init__(self, manager: ocp.CheckpointManager):
        self._manager = manager
        self._signalled = threading.Event()
        self._previous = None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self._signalled.set())

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            return bool(self._manager.reached_preemption(step))
        return self._signalled.is_set()

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

