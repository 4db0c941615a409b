"""Orbax checkpoints of training runs, the params-only format of converted weights, and preemption.

A run's checkpoints live in `<workdir>/checkpoints/<step>/` with four items:
  state/   the train state (`step`, `params`, `opt_state`) as sharded arrays (restorable onto any mesh)
  data/    each process's data-iterator state, `process_<i>-of-<n>.json`
  config/  the run's config as JSON (for the record; the command line stays authoritative)
  digest/  `digest.json`: two checksums of every state array, checked with finiteness on restore

The digest catches what the storage layer does not: a damaged byte range of a data file mostly
decompresses without complaint into NaNs or finite garbage (e.g. 3e38 in Adam's nu). It is computed
on device (each array's bytes as uint32 words: their sum and their position-weighted sum, mod 2^32),
so only two numbers per array reach the host: one pass over the state, cheap next to the save, where
hashing host copies would mean gathering a 37B model's state onto one host. It is not a
cryptographic hash: it finds damage, not tampering. A checkpoint that fails to read, fails the
digest or holds a NaN/Inf raises CorruptCheckpointError with one line naming the step, the array
(or file) and the problem; checkpoints written before digests existed are checked for finiteness.

Converted weights (`--config.init_from=DIR`) are a params-only checkpoint written by `save_params`:
an Orbax PyTree checkpoint of the plain params dict, `{component: subtree}` with components from
`emu2_jax.models.emu2.COMPONENTS` (any subset), laid out exactly like `Emu2Model`'s params.
`load_params` also accepts a training workdir (or its `checkpoints/` folder): its latest step's params
(the `params` of its `state` item, found through this file's layout: `CHECKPOINTS`, the step
folders, the items, which is why both formats live in one file, a little over 400 lines), and
loads a 3D video `unet` from a 2D one (SD 2.1) by inflating it (`unet3d.inflate_params`).
"""
from __future__ import annotations

import json
import logging as pylogging  # the standard library's: asyncio logs through it (absl's `logging` below)
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import traverse_util

from emu2_jax.models import unet3d

PyTree = Any
CHECKPOINTS = "checkpoints"
_ITEMS = ("state", "data", "config", "digest")
CORRUPT = "corrupt_checkpoints"  # next to CHECKPOINTS: corrupt steps set aside by a fallback restore


class CorruptCheckpointError(Exception):
    """A checkpoint that cannot be read or fails verification; the message is one line."""


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
        "digest": ocp.JsonCheckpointHandler(filename="digest.json"),
    }
    return ocp.CheckpointManager(epath.Path(workdir) / CHECKPOINTS, options=options, item_names=_ITEMS,
                                 item_handlers=handlers)


def _words(x: jax.Array) -> jax.Array:
    """The array's bytes as uint32 words (narrower types widened, 8-byte ones split in two)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _array_digest(x: jax.Array) -> jax.Array:
    """[sum of words, sum of words * (1 + position), all finite] as uint32 (sums wrap mod 2^32).

    The weighted sum also sees words moved or swapped. Positions come from iotas over the array's own
    shape, not from a flattened copy, so a sharded array is reduced where it lies.
    """
    words = _words(x)
    position = jnp.ones(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):
        position += jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * np.uint32(stride % 2 ** 32)
        stride *= words.shape[axis]
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.array(True)
    return jnp.stack([jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * position, dtype=jnp.uint32),
                      finite.astype(jnp.uint32)])


_digests = jax.jit(lambda tree: jax.tree.map(_array_digest, tree))


def _array_name(path: tuple) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def state_digest(state: PyTree) -> dict[str, tuple[int, int, bool]]:
    """{array name: (sum, weighted sum, all finite)} of a state's arrays (see the module docstring)."""
    values = jax.device_get(_digests(state))  # a few numbers per array; waits for them
    return {_array_name(path): (int(v[0]), int(v[1]), bool(v[2]))
            for path, v in jax.tree_util.tree_leaves_with_path(values)}


def save_checkpoint(manager: ocp.CheckpointManager, step: int, state: PyTree, data_state: Mapping[str, Any],
                    config: ml_collections.ConfigDict, *, force: bool = False) -> bool:
    """Starts an (async) save of step `step`, with the state's digest; returns whether one was started."""
    if not (force or manager.should_save(step)):
        return False
    digest = {name: [total, weighted] for name, (total, weighted, _) in state_digest(state).items()}
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(dict(data_state)),
        config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
        digest=ocp.args.JsonSave(digest),
    )
    return manager.save(step, args=args, force=force)


def _first_line_of_cause(error: BaseException) -> str:
    """The innermost cause's first line: Orbax wraps TensorStore's error (which names the array and
    the file) in ones that do not."""
    while error.__cause__ is not None:
        error = error.__cause__
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def verify_state(state: PyTree, saved: Mapping[str, Sequence[int]] | None) -> list[str]:
    """What is wrong with a restored state, one line per damaged array: NaN/Inf values, a digest
    mismatch (`saved`: None when the checkpoint predates digests), no digest for it."""
    problems = []
    for name, (total, weighted, finite) in state_digest(state).items():
        wrong = [] if finite else ["holds NaN or Inf values"]
        if saved is not None and name not in saved:
            wrong.append("has no digest")
        elif saved is not None and [total, weighted] != list(saved[name]):
            wrong.append(f"does not match its digest (checksums {[total, weighted]}, saved {list(saved[name])})")
        if wrong:
            problems.append(f"array {name} {' and '.join(wrong)}")
    return problems


def _is_read_error(error: BaseException | None) -> bool:
    """Whether `error` (or what caused it) is Orbax / TensorStore failing to read an array."""
    while error is not None:
        if "while reading array index" in str(error) or "Error reading" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


class _ReadEchoFilter(pylogging.Filter):
    """Drops asyncio's '... exception was never retrieved' for Orbax's sibling reads that failed
    after the restore had already failed (their error is the one reported)."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        first_line = record.getMessage().split("\n", 1)[0]  # Task / Future / _GatheringFuture ...
        return not (first_line.endswith("exception was never retrieved") and _is_read_error(error))


def _drop_failed_read_aftermath() -> None:
    """Silences the echoes of a failed restore, whose error is reported once: Orbax's other reads
    still finish, on TensorStore's threads, into its closed event loop, and each prints a traceback
    ('Event loop is closed', or its own read error from an abandoned coroutine, or, when asyncio
    collects such a task, 'Task exception was never retrieved'). Anything else still reaches the
    previous hook and asyncio's log."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_failed_read_aftermath", False):
        return
    pylogging.getLogger("asyncio").addFilter(_ReadEchoFilter())

    def hook(unraisable: Any) -> None:
        echo = (isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value)
                or getattr(unraisable.object, "__qualname__", "") == "_read_array_index_and_device_put")
        if not echo:
            previous(unraisable)

    hook.drops_failed_read_aftermath = True
    sys.unraisablehook = hook


def restore_checkpoint(manager: ocp.CheckpointManager, step: int, abstract_state: PyTree
                       ) -> tuple[PyTree, dict[str, Any]]:
    """(state, this process's data-iterator state) of `step`, verified (see the module docstring).

    abstract_state: `jax.ShapeDtypeStruct`s with the shardings wanted now; the saved arrays are
    resharded onto them, so the mesh may differ from the one that saved.
    Raises CorruptCheckpointError (one line: the step, the array or file, what is wrong).
    """
    step_dir = epath.Path(manager.directory) / str(step)
    items = dict(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
    has_digest = (step_dir / "digest").is_dir()
    if has_digest:
        items["digest"] = ocp.args.JsonRestore()
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # TensorStore / Orbax: truncated or missing files, undecodable chunks, bad JSON
        _drop_failed_read_aftermath()
        raise CorruptCheckpointError(f"checkpoint {step_dir}: cannot read it: {_first_line_of_cause(e)}") from e
    problems = verify_state(restored.state, restored.digest if has_digest else None)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise CorruptCheckpointError(f"checkpoint {step_dir}: {problems[0]}{more}")
    return restored.state, restored.data


def set_aside(manager: ocp.CheckpointManager, step: int) -> epath.Path:
    """Moves step `step` to `<workdir>/corrupt_checkpoints/` (kept for inspection; out of the way of
    the run's own save of that step) and returns where it went."""
    source = epath.Path(manager.directory) / str(step)
    target = source.parent.parent / CORRUPT / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0:
        target.parent.mkdir(parents=True, exist_ok=True)
        source.rename(target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
    manager.reload()
    return target


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
    """(directory of a PyTree checkpoint, key path of the params inside it) for `init_from`: a
    params-only checkpoint, a training workdir or its checkpoints/ folder (the latest step), or one step."""
    if (path / "state").is_dir() and (path / "config").is_dir():
        return path / "state", ("params",)
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


def _saved_tree(checkpointer: ocp.PyTreeCheckpointer, directory: epath.Path, prefix: tuple[str, ...]) -> PyTree:
    """The saved params' metadata tree (leaves with .shape and .dtype)."""
    saved = checkpointer.metadata(directory)
    saved = getattr(saved, "item_metadata", saved)
    saved = getattr(saved, "tree", saved)
    for key in prefix:
        saved = saved[key]
    return saved


def _fsdp_sharding(shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
    """The array split over every device of `mesh` along its largest dimension they divide
    (replicated if none): a layout that fits any model, for callers without logical axes."""
    spec: list[Any] = [None] * len(shape)
    fits = [d for d in sorted(range(len(shape)), key=lambda d: -shape[d]) if shape[d] % mesh.size == 0]
    if fits:
        spec[fits[0]] = tuple(mesh.axis_names)
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))


def _model_config(path: epath.Path, directory: epath.Path, prefix: tuple[str, ...]) -> dict[str, Any]:
    """{"emu2": Emu2Config, "unet": UNetConfig, "vae": VAEConfig} (those present) of a converted
    checkpoint, or {"emu2" | "decoder" | "video_decoder": config} of a training run (its saved run config)."""
    from emu2_jax.convert.stream import CONFIG_FILE

    if (path / CONFIG_FILE).is_file():
        from emu2_jax.convert.layouts import emu2_config_from_json
        from emu2_jax.models.unet import unet_config_from_diffusers
        from emu2_jax.models.vae import vae_config_from_diffusers

        saved = json.loads((path / CONFIG_FILE).read_text())
        dtype = {"param_dtype": jnp.dtype(saved["dtype"])}
        build = {"emu2": emu2_config_from_json, "unet": lambda c: unet_config_from_diffusers(c, **dtype),
                 "vae": lambda c: vae_config_from_diffusers(c, **dtype)}
        return {k: fn(saved[k]) for k, fn in build.items() if k in saved}
    if prefix:
        run_file = directory.parent / "config" / "config.json"
        if not run_file.is_file():
            raise ValueError(f"{path}: training checkpoint without its run config ({run_file})")
        from emu2_jax.tasks import decoder, llm, video_decoder

        run = ml_collections.ConfigDict(json.loads(run_file.read_text()))
        build = {"decoder": decoder.model_config, "video_decoder": video_decoder.model_config}
        task = run.get("task", "llm")
        return {task: build[task](run)} if task in build else {"emu2": llm.model_config(run)}
    raise ValueError(f"{path}: neither a converted checkpoint (no {CONFIG_FILE}) nor a training run")


def pretrained_config(path: str) -> dict[str, Any]:
    """The model config dict `load_pretrained` would return, without reading any weights."""
    root = epath.Path(path).absolute()
    if not root.exists():
        raise FileNotFoundError(f"{path}: no such directory")
    return _model_config(root, *_params_source(root))


def load_pretrained(path: str, mesh: jax.sharding.Mesh | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model config, params) of a converted checkpoint (`python -m emu2_jax.convert`), an
    `init_from` directory or a training workdir (its latest step), all in one call.

    The model config is a dict: {"emu2": Emu2Config, "unet": UNetConfig, "vae": VAEConfig} with the
    parts present (a training run: {"emu2"}, {"decoder": DecoderModelConfig} or {"video_decoder":
    VideoDecoderModelConfig}). Without `mesh` the params land on the first device; with one, each
    array is restored straight into shards over all of the mesh's devices (split along its largest
    dimension they divide), never whole on one host.
    """
    root = epath.Path(path).absolute()
    if not root.exists():
        raise FileNotFoundError(f"{path}: no such directory")
    directory, prefix = _params_source(root)
    model_config = _model_config(root, directory, prefix)
    saved = _saved_tree(ocp.PyTreeCheckpointer(), directory, prefix)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(
        tuple(m.shape), m.dtype, sharding=device if mesh is None else _fsdp_sharding(tuple(m.shape), mesh)), saved)
    return model_config, load_params(str(root), abstract, list(saved))


def _inflates_unet(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    """Whether a 3D `unet` (it has temporal params) is to be loaded from a 2D one (it has none)."""
    return (any(unet3d.is_temporal(p) for p in traverse_util.flatten_dict(dict(wanted)))
            and not any(unet3d.is_temporal(p) for p in traverse_util.flatten_dict(dict(saved))))


def load_params(path: str, abstract_params: Mapping[str, Any], components: Sequence[str],
                fresh_params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Restores the given top-level components of a params-only checkpoint (or of a training run).

    abstract_params: the model's params as ShapeDtypeStructs with shardings; the returned subtrees
    follow them. A vision position table saved for another resolution (Emu2 stage 1 at 224 px, then
    448 px) is resized; any other shape difference is an error naming the parameter.
    fresh_params: the model's freshly initialised params. With them, a 3D (video) `unet` loads from a
    checkpoint's 2D UNet of the same topology (SD 2.1): the spatial weights are read and the
    temporal ones kept from `fresh_params` (`unet3d.inflate_params`; they start as the identity).
    Any other missing parameter is an error naming it.
    """
    directory, prefix = _params_source(epath.Path(path).absolute())
    checkpointer = ocp.PyTreeCheckpointer()
    saved = _saved_tree(checkpointer, directory, prefix)
    missing = [c for c in components if c not in saved]
    if missing:
        raise ValueError(f"init_from={path}: no component(s) {missing} in the checkpoint (has {sorted(saved)}); "
                         f"choose the ones to load with --config.init_components")

    wanted = {c: abstract_params[c] for c in components}
    inflate = fresh_params is not None and "unet" in wanted and _inflates_unet(saved["unet"], wanted["unet"])
    if inflate:  # Only the spatial params are read; the temporal ones come from fresh_params below.
        flat = traverse_util.flatten_dict(dict(wanted["unet"]))
        wanted["unet"] = traverse_util.unflatten_dict({p: v for p, v in flat.items() if not unet3d.is_temporal(p)})
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
    if inflate:  # every spatial param is there (`target`); a 2D param the 3D UNet lacks is a topology mismatch
        try:
            unet3d.check_inflatable(saved["unet"], abstract_params["unet"])
        except ValueError as e:
            raise ValueError(f"init_from={path}: unet: {e}") from None
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
    if inflate:
        restored["unet"] = unet3d.inflate_params(restored["unet"], fresh_params["unet"])
        spatial = jax.tree.leaves(wanted["unet"])
        temporal = [x for p, x in traverse_util.flatten_dict(restored["unet"]).items() if unet3d.is_temporal(p)]
        logging.info("init_from: inflated the 2D UNet of %s into the 3D unet: %d spatial params (%d values) "
                     "loaded, %d temporal params (%d values) kept at their initialisation (identity)",
                     path, len(spatial), sum(x.size for x in spatial), len(temporal), sum(x.size for x in temporal))
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


def restore_latest(manager: ocp.CheckpointManager, abstract_state: PyTree, *, fallback: bool
                   ) -> tuple[PyTree, dict, int] | None:
    """(state, data-iterator state, step) of the latest checkpoint; None if there is none.

    A corrupt latest checkpoint is an error (CorruptCheckpointError), or with `fallback` a logged
    line, the step is set aside (kept for inspection, out of the way of the run's next saves) and
    the previous one is tried.
    """
    corrupt = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            return (*restore_checkpoint(manager, step, abstract_state), step)
        except CorruptCheckpointError as e:
            if not fallback:
                raise CorruptCheckpointError(
                    f"{e}; to resume from the previous intact checkpoint pass --config.restore_fallback=True"
                ) from None
            logging.error("%s; set aside in %s, trying the previous checkpoint (config.restore_fallback=True).",
                          e, set_aside(manager, step))
            corrupt.append(step)
    if corrupt:  # never start afresh over a run's corrupt checkpoints
        raise CorruptCheckpointError(f"no intact checkpoint in {manager.directory}: steps {corrupt} "
                                                   f"are corrupt (set aside)")
    return None
