r"""Trains Emu2 / Emu at any stage of the papers' recipe, the visual decoder included.

    python -m emu2_jax.train --config=configs/stage1.py:tiny --workdir=/tmp/emu2_stage1
    python -m emu2_jax.train --config=configs/decoder.py:tiny --workdir=/tmp/emu2_decoder

Each stage is a config file (configs/<stage>.py; `:tiny` runs on a laptop CPU in minutes) and any
field can be overridden on the command line, e.g. `--config.total_steps=200`. Running the same
command again resumes from the latest checkpoint in the workdir. What lands in the workdir:
  checkpoints/<step>/   Orbax checkpoints (state, data-iterator state, config), see checkpointing.py
  events.out.tfevents.* TensorBoard scalars (losses, learning rates, grad and param norms, throughput,
                        MFU) and the task's samples (LLM stages: the sample images with captions)
  samples/              the task's samples, e.g. step_<N>.json greedy captions (LLM stages)

What differs between stages is a *task* (emu2_jax.tasks, named by `config.task`): the LLM stages'
`tasks.llm.LlmTask` or the visual decoder's `tasks.decoder.DecoderTask`. A task gives the model, the
batch layout, the loss of a microbatch, the data iterator, the FLOPs of a step and the samples; the
loop, optimizer, shardings and checkpoints here are shared.

The file is a little over 400 lines because it is the one loop every stage runs, read top to
bottom as the flax examples do (state creation, resume, step, logging, samples, checkpoints,
preemption); what varies lives in the tasks.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import config_flags

from emu2_jax import checkpointing, cli, metrics, optim, tasks
from emu2_jax import plan as plan_lib
from emu2_jax import sharding as sh
from emu2_jax.data import layout, pipeline

PyTree = Any
Batch = Mapping[str, np.ndarray]

# Models above this size are refused on a host without accelerators (a 37B run would try to
# allocate ~150 GB before failing); the `:tiny` variants are far below it.
MAX_CPU_PARAMS = 2_000_000_000


@flax.struct.dataclass
class TrainState:
    step: jax.Array        # optimizer updates done (int32 scalar)
    params: PyTree         # every component, frozen ones included
    opt_state: PyTree      # optimizer state of the trainable subtree only


# ---------------------------------------------------------------------------------------------
# Config checks, done before any work.

# Integer fields and their lowest allowed value: the loop divides by the *_every_steps and counts
# steps and streaks with the others.
_MIN_VALUES = (("total_steps", 1), ("global_batch_size", 1), ("grad_accum_steps", 0), ("log_every_steps", 1),
               ("checkpoint_every_steps", 1), ("sample_every_steps", 0), ("max_consecutive_nonfinite", 1))


def init_sources(config: ml_collections.ConfigDict) -> dict[str, list[str]]:
    """{checkpoint path: the components loaded from it} of `init_components`, whose comma-separated
    entries are `name` (loaded from `init_from`) or `name=PATH` (from PATH): a video decoder takes
    `unet` and `vae` from SD 2.1 and `visual` from Emu2. Empty when nothing is loaded (no `init_from`
    and no entry with a path: a fresh start, whatever the config's default components).
    Raises ValueError (one line naming the field and the entry) on a malformed entry.
    """
    entries = [e.strip() for e in config.init_components.split(",") if e.strip()]
    if not config.init_from and not any("=" in e for e in entries):
        return {}
    sources: dict[str, list[str]] = {}
    seen: set[str] = set()
    for entry in entries:
        name, has_path, path = (part.strip() for part in entry.partition("="))
        where = f"--config.init_components={config.init_components!r}: entry {entry!r}"
        if not name:
            raise ValueError(f"{where} names no component")
        if has_path and not path:
            raise ValueError(f"{where} has an empty path (name=PATH)")
        if not has_path and not config.init_from:
            raise ValueError(f"{where} has no path and --config.init_from is empty; write {name}=PATH")
        if name in seen:
            raise ValueError(f"{where}: {name!r} is given twice")
        seen.add(name)
        sources.setdefault(path or config.init_from, []).append(name)
    return sources


def validate_config(config: ml_collections.ConfigDict) -> list[str]:
    """One line per invalid field, naming it (as a command-line override) and its allowed values."""
    errors = [f"--config.{name}={config[name]}: must be an integer >= {low}"
              for name, low in _MIN_VALUES if not isinstance(config[name], int) or config[name] < low]
    if config.nonfinite not in ("skip", "stop"):
        errors.append(f"--config.nonfinite={config.nonfinite!r}: must be 'skip' or 'stop'")
    try:
        sources = init_sources(config)
    except ValueError as e:
        errors.append(str(e))
    else:
        task = tasks.TASKS.get(config.task)  # an unknown task is reported where it is built
        unknown = [c for names in sources.values() for c in names if task and c not in task.components]
        if unknown:
            errors.append(f"--config.init_components={config.init_components!r}: unknown component(s) {unknown} "
                          f"of task {config.task!r} (it has {', '.join(task.components)})")
    return errors + pipeline.config_errors(config.data)


# ---------------------------------------------------------------------------------------------
# Model, mesh and shardings.


def check_fits_host(config: ml_collections.ConfigDict, num_params: int) -> None:
    """Refuses to build a large model where there is no accelerator, saying what to run instead."""
    if jax.default_backend() == "cpu" and num_params > MAX_CPU_PARAMS and not config.allow_large_on_cpu:
        raise SystemExit(
            f"model {config.model!r} has {num_params / 1e9:.1f}B parameters and this machine has no "
            f"accelerator (JAX backend: cpu). To try the recipe on CPU add the tiny variant, e.g. "
            f"--config=configs/{config.stage}.py:tiny ; to insist, pass --config.allow_large_on_cpu=True.")


def make_global_batch(local: Batch, sharding: NamedSharding, accum_steps: int,
                      batch_layout: layout.Layout = layout.LLM) -> dict[str, jax.Array]:
    """This process's rows [B_local, ...] -> global arrays [accum, B_global / accum, ...] of the
    arrays of `batch_layout` (the task's), after checking their shapes and dtypes against it."""
    layout.check(batch_layout, local)
    out = {}
    for key in layout.keys(batch_layout):
        value = np.asarray(local[key])
        value = value.reshape(accum_steps, value.shape[0] // accum_steps, *value.shape[1:])
        global_shape = (accum_steps, value.shape[1] * jax.process_count(), *value.shape[2:])
        out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out


# ---------------------------------------------------------------------------------------------
# The train step.


def make_train_step(task: tasks.Task, tx: optax.GradientTransformation, config: ml_collections.ConfigDict,
                    is_trainable: Callable, schedules: Mapping[str, optax.Schedule], trainable_shardings: PyTree,
                    micro_sharding: NamedSharding) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """One optimizer update from a batch [accum, rows, ...], accumulating gradients over `accum`.

    Gradients are taken w.r.t. the trainable subtree only, so XLA drops the frozen backward. The
    task's microbatch losses sum to the batch's loss. Randomness (the decoder's noise) comes from
    `config.seed` folded with the step and the microbatch, so a resumed run draws the same. An update
    whose loss, gradient or new parameters hold a NaN/Inf is skipped (parameters and optimizer state
    kept, step counted).
    """
    def train_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        trainable, frozen = optim.split_params(state.params, is_trainable)
        normalizers = task.loss_normalizers(batch)
        step_rng = jax.random.fold_in(jax.random.key(config.seed), state.step)

        def micro_loss(trainable, micro, rng):
            micro = jax.lax.with_sharding_constraint(micro, micro_sharding)
            return task.micro_loss(optim.merge_params(trainable, frozen), micro, normalizers, rng)

        def accumulate(carry, inputs):
            grads, loss, parts = carry
            micro, index = inputs
            (micro_loss_value, micro_parts), micro_grads = jax.value_and_grad(micro_loss, has_aux=True)(
                trainable, micro, jax.random.fold_in(step_rng, index))
            grads = jax.tree.map(lambda g, u: g + u.astype(jnp.float32), grads, micro_grads)
            grads = jax.lax.with_sharding_constraint(grads, trainable_shardings)
            return (grads, loss + micro_loss_value, jax.tree.map(jnp.add, parts, micro_parts)), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable)
        zero_parts = {k: jnp.zeros((), jnp.float32) for k in task.metric_names}
        accum = jax.tree.leaves(batch)[0].shape[0]
        (grads, loss, parts), _ = jax.lax.scan(accumulate, (zeros, jnp.zeros((), jnp.float32), zero_parts),
                                               (batch, jnp.arange(accum)))

        updates, new_opt_state = tx.update(grads, state.opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        grad_norm, param_norm, finite = optim.update_norms(loss, grads, new_trainable)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = state.replace(
            step=state.step + 1,
            params=optim.merge_params(keep(new_trainable, trainable), frozen),
            opt_state=keep(new_opt_state, state.opt_state))
        step_metrics = {**parts, **task.counts(batch), "loss": loss, "grad_norm": grad_norm,
                        "param_norm": param_norm,
                        "nonfinite": (~finite).astype(jnp.float32)}
        groups = sorted({optim.GROUP_OF_COMPONENT[c] for c in trainable})
        step_metrics.update({f"lr/{g}": schedules[g](state.step) for g in groups})
        return new_state, step_metrics

    return train_step


# ---------------------------------------------------------------------------------------------
# The run.


@dataclasses.dataclass(frozen=True)
class Trainer:
    """What a run builds from its config before the first step (nothing allocated yet)."""
    task: tasks.Task
    mesh: jax.sharding.Mesh
    rules: sh.Rules                     # logical-axis rules in force (defaults + config.sharding_rules)
    tx: optax.GradientTransformation
    is_trainable: Callable
    param_shardings: PyTree
    state_shardings: TrainState
    abstract_state: TrainState          # ShapeDtypeStructs with shardings (restore target)
    batch_sharding: NamedSharding
    train_step: Callable                # jitted (state, global batch) -> (state, metrics); donates state
    num_trainable: int

    @property
    def model_cfg(self) -> Any:
        return self.task.model_cfg

    @property
    def model(self) -> nn.Module:
        return self.task.model

    @property
    def num_params(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.abstract_state.params))


def create_trainer(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Trainer:
    """Model, mesh, shardings, optimizer and the jitted train step of `config` (on `devices`, default all)."""
    unresolved = plan_lib.unresolved_fields(config)
    if unresolved:
        raise ValueError(f"{', '.join(unresolved)} must be resolved first: emu2_jax.plan.apply(config, devices)")
    task = tasks.create(config)
    rules = sh.rules_with_overrides(config.sharding_rules)
    mesh = sh.create_mesh(config.mesh_shape, devices)
    replicated = NamedSharding(mesh, PartitionSpec())
    rows, batch_shards = config.global_batch_size, sh.batch_shards(mesh, rules)
    if rows % (config.grad_accum_steps * batch_shards) or rows % jax.process_count():
        raise ValueError(f"global_batch_size={rows} must divide into grad_accum_steps={config.grad_accum_steps} "
                         f"microbatches over {batch_shards} batch shards (mesh {dict(mesh.shape)}) and "
                         f"{jax.process_count()} processes")

    # Parameters: shapes and logical axes from an abstract init, then shardings on this mesh.
    abstract = jax.eval_shape(task.model.init, jax.random.key(0), task.dummy_batch(1))
    abstract_params = nn.unbox(abstract)["params"]
    param_shardings = sh.param_shardings(abstract, mesh, rules)["params"]
    check_fits_host(config, sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params)))

    # Optimizer state exists for the trainable subtree only.
    is_trainable = optim.trainable_predicate(tuple(config.trainable), lora=task.lora, components=task.components)
    tx, schedules = optim.create_optimizer(config.optimizer, config.total_steps)
    missing = {optim.GROUP_OF_COMPONENT[c] for c in config.trainable} - set(schedules)
    if missing:
        raise ValueError(f"trainable={tuple(config.trainable)} needs optimizer.learning_rate for {sorted(missing)}")
    abstract_trainable, _ = optim.split_params(abstract_params, is_trainable)
    trainable_shardings, _ = optim.split_params(param_shardings, is_trainable)
    abstract_opt_state = jax.eval_shape(tx.init, abstract_trainable)
    state_shardings = TrainState(
        step=replicated, params=param_shardings,
        opt_state=optim.opt_state_shardings(abstract_opt_state, trainable_shardings, replicated))
    abstract_state = checkpointing.abstract_like(
        TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params, opt_state=abstract_opt_state),
        state_shardings)

    micro_sharding = sh.batch_sharding(mesh, rules, leading_accum=False)
    batch_sharding = sh.batch_sharding(mesh, rules)
    step_fn = make_train_step(task, tx, config, is_trainable, schedules, trainable_shardings, micro_sharding)
    train_step = jax.jit(sh.with_logical_rules(step_fn, mesh, rules), in_shardings=(state_shardings, batch_sharding),
                         out_shardings=(state_shardings, replicated), donate_argnums=(0,))
    return Trainer(task=task, mesh=mesh, rules=rules, tx=tx, is_trainable=is_trainable,
                   param_shardings=param_shardings, state_shardings=state_shardings,
                   abstract_state=abstract_state, batch_sharding=batch_sharding, train_step=train_step,
                   num_trainable=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_trainable)))


def init_state(trainer: Trainer, config: ml_collections.ConfigDict) -> TrainState:
    """A fresh state at step 0: random parameters, those of `init_components` loaded (`init_sources`)."""
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), trainer.task.dummy_batch(1))
    init = jax.jit(lambda rng: nn.unbox(trainer.model.init(rng, zeros))["params"],
                   out_shardings=trainer.param_shardings)
    params = init(jax.random.key(config.seed))
    sources = init_sources(config)
    if sources:
        for path, components in sources.items():
            # The fresh params go along: a video UNet inflated from a 2D one keeps their temporal layers.
            params = {**params, **checkpointing.load_params(path, trainer.abstract_state.params, components,
                                                            fresh_params=params)}
        loaded = [c for components in sources.values() for c in components]
        fresh = [c for c in params if c not in loaded]
        logging.info("Starting at step 0 from %s%s.",
                     "; ".join(f"{path} ({', '.join(components)})" for path, components in sources.items()),
                     f"; freshly initialised: {', '.join(fresh)}" if fresh else "")
    else:
        logging.info("Starting from scratch at step 0 (random initialisation, seed %d).", config.seed)
    trainable, _ = optim.split_params(params, trainer.is_trainable)
    opt_state = jax.jit(trainer.tx.init, out_shardings=trainer.state_shardings.opt_state)(trainable)
    # Placed like the step's outputs: an uncommitted scalar would make the second call recompile.
    step = jax.device_put(jnp.zeros((), jnp.int32), trainer.state_shardings.step)
    return TrainState(step=step, params=params, opt_state=opt_state)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       devices: Sequence[jax.Device] | None = None) -> TrainState:
    """Runs (or resumes) the training run of `config` in `workdir` (on `devices`, default all)."""
    errors = validate_config(config)
    if errors:
        raise ValueError("\n".join(errors))
    os.makedirs(workdir, exist_ok=True)
    config, _ = plan_lib.apply(config, devices if devices is not None else jax.devices())
    trainer = create_trainer(config, devices)
    task, mesh = trainer.task, trainer.mesh
    sampler = task.create_sampler(mesh, trainer.rules, workdir) if config.sample_every_steps else None
    if config.sample_every_steps and sampler is None:
        raise ValueError(f"stage {config.stage!r} writes no samples during training (set sample_every_steps=0); "
                         f"decode images of a checkpoint with `python -m emu2_jax.autoencode`")
    logging.info("Model %s: %.3fB parameters, %.3fB trainable (%s%s); mesh %s", config.model,
                 trainer.num_params / 1e9, trainer.num_trainable / 1e9, ",".join(config.trainable),
                 ", LoRA adapters only in llm" if task.lora else "", dict(mesh.shape))

    # Data: this process's rows of every global batch.
    data_iter = task.create_iterator(config.global_batch_size // jax.process_count(), jax.process_index(),
                                     jax.process_count())

    # State: resume from the latest checkpoint, else start fresh (optionally from converted weights).
    manager = checkpointing.create_manager(workdir, save_every_steps=config.checkpoint_every_steps,
                                           keep=config.keep_checkpoints, async_save=config.async_checkpointing)
    restored = checkpointing.restore_latest(manager, trainer.abstract_state, fallback=config.restore_fallback)
    if restored is not None:
        state, data_state, latest = restored
        data_iter.set_state(data_state)
        logging.info("Resuming from step %d (checkpoint %s/%d).", latest, manager.directory, latest)
    else:
        state = init_state(trainer, config)
    start_step = int(state.step)

    # Reporting.
    writer = metrics.SummaryWriter(workdir) if jax.process_index() == 0 else None
    flops = task.training_flops(trainer.abstract_state.params)
    peak = config.peak_tflops_per_device * 1e12 or metrics.peak_flops_per_device()
    preemption = checkpointing.PreemptionWatcher(manager)

    def save(step: int, force: bool = False) -> None:
        if checkpointing.save_checkpoint(manager, step, state, data_iter.get_state(), config, force=force):
            logging.info("Saving checkpoint at step %d to %s/%d.", step, manager.directory, step)

    history: list[dict] = []
    pending: tuple[int, dict] | None = None  # the last step's metrics, fetched one step late
    skipped_in_a_row = 0

    def flush() -> None:
        """Fetches the pending step's metrics: reports a non-finite step, stops if so configured or
        after `max_consecutive_nonfinite` of them in a row. Every save is preceded by a flush, so no
        checkpoint is written of a state whose last updates were skipped beyond the limit."""
        nonlocal pending, skipped_in_a_row
        if pending is None:
            return
        step, host = pending[0], jax.device_get(pending[1])
        pending = None
        history.append(host)
        skipped_in_a_row = skipped_in_a_row + 1 if host["nonfinite"] else 0
        if not skipped_in_a_row:
            return
        parts = ", ".join(f"{k} {float(host[k]):.4g}" for k in ("loss", *task.metric_names, "grad_norm"))
        if config.nonfinite == "stop":
            raise FloatingPointError(f"non-finite loss or update at step {step} ({parts}); stopping as "
                                     f"config.nonfinite='stop' says (the update was not applied)")
        if skipped_in_a_row >= config.max_consecutive_nonfinite:
            raise FloatingPointError(
                f"{skipped_in_a_row} consecutive non-finite steps ({step - skipped_in_a_row + 1} to {step}), the "
                f"last at step {step} ({parts}); stopping as config.max_consecutive_nonfinite="
                f"{config.max_consecutive_nonfinite} says: no update is applied, check the loss weights, learning "
                f"rates and data")
        logging.warning("Non-finite loss or update at step %d (%s): update skipped.", step, parts)

    if start_step >= config.total_steps:
        logging.info("Already at step %d of %d: nothing to train.", start_step, config.total_steps)
    try:
        throughput = None
        loop_start = time.perf_counter()
        for step in range(start_step + 1, config.total_steps + 1):
            batch = make_global_batch(next(data_iter), trainer.batch_sharding, config.grad_accum_steps,
                                      task.batch_layout)
            state, step_metrics = trainer.train_step(state, batch)
            flush()  # the previous step's, which has finished by now: no stall of the device queue
            pending = (step, step_metrics)
            is_log_step = step % config.log_every_steps == 0 or step == config.total_steps
            if throughput is None or is_log_step:
                flush()
                values = {**metrics.mean_metrics(history), **data_iter.stats()}  # data/skipped/<reason>, ...
                if throughput is None:  # the first step compiles: report it alone, then start the clocks
                    line = f"{metrics.progress_line(step, config.total_steps, values)} | first step " \
                           f"(with compilation) {time.perf_counter() - loop_start:.1f}s"
                    throughput = metrics.Throughput(step, config.total_steps, flops, peak)
                else:
                    values.update(throughput.report(step, sum(h["tokens"] for h in history),
                                                    sum(h["images"] for h in history)))
                    line = metrics.progress_line(step, config.total_steps, values)
                history.clear()
                logging.info("%s", line)
                if writer:
                    writer.scalars(step, values)
            if config.sample_every_steps and (step % config.sample_every_steps == 0 or step == config.total_steps):
                sampler(step, state.params, writer)
            if preemption.reached(step):
                flush()
                save(step, force=True)
                logging.info("Preemption notice (SIGTERM) at step %d: checkpoint written, exiting.", step)
                break
            if manager.should_save(step) or step == config.total_steps:
                flush()  # never write the state of a run that is about to stop on a NaN
                save(step, force=step == config.total_steps)
    finally:  # also on errors: finish the saves in flight (they hold clean states)
        manager.wait_until_finished()
        manager.close()
        preemption.close()
        if writer:
            writer.close()
        data_iter.close()
    return state


# ---------------------------------------------------------------------------------------------
# Entry point.

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config, e.g. configs/stage1.py:tiny.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard files and samples.")
_LIBRARY_LOGS = flags.DEFINE_bool("library_logs", False, "Also show the INFO logs of JAX, Orbax, grain, ...")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Call jax.distributed.initialize() (every process of a multi-host job must): 'auto' does when the "
    "environment names several processes (JAX_COORDINATOR_ADDRESS, GKE TPU / Megascale variables, SLURM, "
    "Open MPI); on a Cloud TPU pod slice started with gcloud, pass --distributed=on.")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    distributed = _DISTRIBUTED.value == "on" or (_DISTRIBUTED.value == "auto" and cli.multi_process_environment())
    if not distributed:  # several processes: JAX's preemption notifier owns SIGTERM
        signal.signal(signal.SIGTERM, cli.exit_on_sigterm_during_start_up)
    errors = validate_config(_CONFIG.value)
    if errors:
        raise SystemExit("\n".join(errors))
    if not _LIBRARY_LOGS.value:
        logging.get_absl_handler().addFilter(cli.OwnInfoOnly())
    if distributed:
        jax.distributed.initialize()
    logging.info("JAX process %d/%d, %d local / %d global devices (%s)", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count(), jax.default_backend())
    started = time.time()
    try:
        train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (FloatingPointError, checkpointing.CorruptCheckpointError) as e:  # one line says it all
        raise SystemExit(str(e)) from None
    logging.info("Done in %s.", metrics.format_duration(time.time() - started))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=cli.parse_flags)
