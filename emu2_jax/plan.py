"""Automatic pod plans: the mesh, the gradient accumulation and the remat policy of a run, chosen
from the device count, the chip and the stage's global batch (docs/sharding.md#automatic-plans).

A config asks for a plan with `mesh_shape="auto"`, `grad_accum_steps=0` and / or
`model_overrides.remat_policy="auto"` (the full-size LLM configs' defaults); whatever is set
explicitly is kept. Candidates:

- tensor in {1, 2, 4, 8}, dividing every dimension the rules put on `tensor` (heads, MLP, vocab);
- data x fsdp splitting the rest, the global batch divisible over the batch shards;
- an accumulation dividing each batch shard's rows;
- a remat policy among AUTO_POLICIES (all but `none`).

Each is scored by an analytic model:

- memory per chip = the training state's shards on that mesh (exact: parameters, Adam moments and
  float32 gradients, accumulated and per microbatch) + the chip's share of the global batch
  (exact) + one microbatch's activations (the per-layer tensors the remat policy keeps; one
  layer's recompute working set, the chunked loss and the encoder) + FIXED_GIB, calibrated against
  XLA:TPU's `memory_analysis` of the 37B stages (tests/test_plan.py compares plans with compiled ones);
- step time = compute + exposed communication. Compute: the task's analytic FLOPs x the policy's
  recompute factor at the chips' peak. Communication: the FSDP all-gathers (forward and backward,
  compute dtype) and gradient reduce-scatters (float32) of every microbatch plus the data-parallel
  all-reduce, at the chip's ICI bandwidth. Assumed overlap: XLA's latency-hiding scheduler
  prefetches the next layer's weights behind the current layer's compute, so what is exposed is
  each microbatch's first-layer gather, the closing all-reduce, and any communication beyond the
  compute.

The chosen plan is the fastest whose memory is at most HEADROOM x HBM; estimates within 1% of the
fastest are ties, going to fewer microbatches, then to less memory.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import linen as nn

from emu2_jax import sharding as sh

GIB = 2 ** 30
AUTO = "auto"
NEAR_TIE = 1.01          # step estimates this close are ties
HEADROOM = 0.85          # of HBM: XLA's own buffers, fragmentation, the data pipeline's prefetch
# Calibration against XLA:TPU's memory_analysis of compiled 37B steps with uint8 pixel rows (stage
# 2 on v5p-128 under every policy at 145 and 725 microbatches, and the chosen plans of the fits
# tables, docs/sharding.md): what a policy keeps is held about once, the working set about once,
# plus a few GiB that scale with neither (the step's own buffers, the loss chunk's logits).
FIXED_GIB = 4.3          # code, collective buffers, the step's fixed-size buffers
REMAT_POLICIES = ("none", "dots_no_batch", "minimal", "save_qkv_proj", "full")
# The policies `remat_policy="auto"` picks from: those whose activation estimate is at most 16% below
# compiled 37B steps (HEADROOM absorbs that). Not `none`: with the encoder training (stage 1), XLA
# keeps 1.2-1.5x the estimate, and dots_no_batch costs at most 2% more FLOPs.
AUTO_POLICIES = REMAT_POLICIES[1:]
# Recomputed FLOPs in the backward pass, as a factor over a trained model's 3 passes: XLA:TPU's
# program FLOPs over those of `none` on stage 2 (v5p-128): dots_no_batch keeps every matmul output
# without a batch dimension and recomputes attention only; minimal also recomputes the MLP's
# gate / up; save_qkv_proj also o and down; full everything.
RECOMPUTE = {"none": 1.0, "dots_no_batch": 1.014, "minimal": 1.132, "save_qkv_proj": 1.154, "full": 1.221}


@dataclasses.dataclass(frozen=True)
class Chip:
    platform: str        # libtpu's topology prefix, or the GPU's name
    hbm_gib: float
    peak_tflops: float   # dense bf16
    hbm_gbps: float      # HBM bandwidth, GB/s
    ici_gbps: float      # bidirectional inter-chip bandwidth per chip, GB/s (Cloud TPU / NVLink specs)
    cores_per_name: int  # Cloud names count TensorCores: v4-256 / v5p-256 are 128 chips
    dims: int            # torus dimensions


CHIPS = {
    "v4": Chip("v4", 32, 275, 1228, 300, 2, 3),
    "v5p": Chip("v5p", 95, 459, 2765, 1200, 2, 3),
    "v5e": Chip("v5e", 16, 197, 819, 400, 1, 2),
    "v6e": Chip("v6e", 32, 918, 1640, 800, 1, 2),
    "h100": Chip("h100", 80, 989, 3350, 900, 1, 0),
    "h200": Chip("h200", 141, 989, 4800, 900, 1, 0),
}
# jax Device.device_kind -> CHIPS key.
DEVICE_KINDS = {"tpu v4": "v4", "tpu v5": "v5p", "tpu v5p": "v5p", "tpu v5 lite": "v5e", "tpu v5e": "v5e",
                "tpu v6 lite": "v6e", "tpu v6e": "v6e", "nvidia h100": "h100", "nvidia h200": "h200"}


def chip_of(device: jax.Device) -> Chip | None:
    """The chip a device is, by its kind (None for CPUs and unknown accelerators)."""
    kind = device.device_kind.lower()
    key = next((v for k, v in sorted(DEVICE_KINDS.items(), key=lambda kv: -len(kv[0])) if kind.startswith(k)), None)
    return CHIPS[key] if key else None


@dataclasses.dataclass(frozen=True)
class Plan:
    mesh_shape: tuple[int, int, int]
    grad_accum_steps: int
    remat_policy: str
    rows_per_chip: int            # rows of one microbatch on one batch shard
    state_gib: float              # parameters, optimizer state, gradients
    batch_gib: float              # this chip's share of the global batch
    activation_gib: float
    memory_gib: float             # estimated peak per chip
    compute_s: float
    communication_s: float        # all collectives of a step at the chip's ICI bandwidth
    exposed_s: float              # the part not overlapped with compute
    step_s: float                 # compute + exposed

    def describe(self) -> str:
        return (f"mesh (data, fsdp, tensor) = {self.mesh_shape}, grad_accum_steps {self.grad_accum_steps} "
                f"({self.rows_per_chip} rows per chip per microbatch), remat {self.remat_policy}; estimated "
                f"{self.memory_gib:.1f} GiB per chip (state {self.state_gib:.1f} + batch {self.batch_gib:.1f} + "
                f"activations {self.activation_gib:.1f}), step {self.step_s:.2f} s (compute {self.compute_s:.2f} s, "
                f"communication {self.communication_s:.2f} s of which {self.exposed_s:.2f} s exposed)")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _bytes(dtype: Any) -> int:
    return np.dtype(dtype).itemsize


def tensor_sizes_allowed(boxed_params: Any, rules: sh.Rules, chips: int) -> list[int]:
    """Tensor-parallel degrees (<= 8: one host's chips) that divide every parameter dimension the
    rules shard over `tensor` and the chip count."""
    logical = nn.get_partition_spec(boxed_params)
    shapes = nn.unbox(boxed_params)
    on_tensor: set[int] = set()

    def visit(spec, leaf):
        for size, axes in zip(leaf.shape, nn.logical_to_mesh_axes(tuple(spec), rules)):
            names = axes if isinstance(axes, tuple) else (axes,)
            if "tensor" in names:
                on_tensor.add(size)

    jax.tree.map(visit, logical, shapes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    return [t for t in (1, 2, 4, 8) if chips % t == 0 and all(size % t == 0 for size in on_tensor)]


def state_bytes(boxed_params: Any, is_trainable: Any, mesh: jax.sharding.Mesh, rules: sh.Rules) -> float:
    """Per-chip bytes of the parameters, and for the trainable ones Adam's two float32 moments and
    float32 gradients (the accumulator and one microbatch's), as sharded on `mesh`."""
    from emu2_jax import optim  # pylint: disable=import-outside-toplevel  (optim imports models)

    shardings = sh.param_shardings(boxed_params, mesh, rules)
    params = nn.unbox(boxed_params)
    trainable, _ = optim.split_params(params, is_trainable)
    train_paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(trainable)}
    total = 0.0
    for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(shardings)):
        numel = math.prod(sharding.shard_shape(leaf.shape))
        total += numel * _bytes(leaf.dtype)
        if jax.tree_util.keystr(path) in train_paths:
            total += numel * 4 * 4   # Adam mu, nu; gradient accumulator, microbatch gradient
    return total


def _kept_per_token(policy: str, d: float, qkv: float, f: float, scores: float, cb: int) -> float:
    """Elements of the compute dtype one transformer block keeps per token for the backward pass
    under `policy`: d the width, qkv / f the query-key-value and MLP widths on this chip, scores
    this chip's attention scores per token."""
    return {"full": d, "save_qkv_proj": d + qkv, "minimal": 3 * d + qkv, "dots_no_batch": 3 * d + qkv + 2 * f,
            # none: also the rotated q, k, the norms' float32 inputs and float32 scores + probabilities
            "none": 10 * d + 2 * qkv + 3 * f + scores * (4 + cb) / cb}[policy]


def llm_activation_bytes(model_cfg: Any, config: ml_collections.ConfigDict, rows: int, tensor: int,
                         policy: str, vision_trained: bool) -> tuple[float, float]:
    """(kept, working): one microbatch's activations on one chip, `rows` rows of `seq_len` tokens
    and `max_images_per_row` images, heads / MLP / vocab split `tensor` ways. Kept: what the remat
    policy saves for the backward pass, every layer (the encoder's too when it trains); working: one
    layer's forward + backward at once, the chunked loss and the encoder."""
    llm, vision = model_cfg.llm, model_cfg.vision
    cb = _bytes(llm.dtype)
    s, d, f, t = config.seq_len, llm.hidden_size, llm.intermediate_size, tensor
    scores = llm.num_heads / t * s          # per token: one row of each head's attention scores
    kept = llm.num_layers * rows * s * cb * _kept_per_token(
        policy, d, (llm.num_heads + 2 * llm.num_kv_heads) * llm.head_dim / t, f / t, scores, cb)
    images = rows * max(config.max_images_per_row, 1)
    tokens = vision.num_patches + 1
    if vision_trained:
        kept += vision.depth * images * tokens * cb * _kept_per_token(
            policy, vision.width, 3 * vision.width / t, vision.mlp_dim / t, vision.num_heads / t * tokens, cb)
    # Scores and probabilities in float32 and their gradients, the MLP's hidden activations,
    # float32 residual gradients.
    working = rows * s * (scores * (8 + cb) + 4 * f / t * cb + 8 * d * 4)
    chunk = min(config.get("text_loss_chunk") or s, s)
    working += rows * chunk * llm.vocab_size / t * 12 + rows * s * d * 8
    working += images * tokens * (vision.num_heads / t * tokens * (8 + cb) + 4 * vision.mlp_dim / t * cb
                                  + 8 * vision.width)
    return kept, working


def candidates(chips: int, batch: int, tensors: Sequence[int], mesh_shape: Any, accum: int,
               policies: Sequence[str]) -> list[tuple[tuple[int, int, int], int, str]]:
    """(mesh, accumulation, policy) triples that divide the batch exactly; fixed parts kept."""
    if mesh_shape != AUTO:
        meshes = [sh.resolve_mesh_shape(mesh_shape, chips)]
    else:
        meshes = [(data, rest // data, t) for t in tensors for rest in [chips // t] for data in _divisors(rest)]
    out = []
    for mesh in meshes:
        shards = mesh[0] * mesh[1]
        if batch % shards:
            continue
        for steps in ([accum] if accum else _divisors(batch // shards)):
            if (batch // shards) % steps == 0:
                out.extend((mesh, steps, p) for p in policies)
    return out


def unresolved_fields(config: ml_collections.ConfigDict) -> list[str]:
    """The config fields that ask for a plan, as command-line overrides."""
    return [name for name, auto in (("--config.mesh_shape", config.mesh_shape == AUTO),
                                    ("--config.grad_accum_steps", config.grad_accum_steps == 0),
                                    ("--config.model_overrides.remat_policy",
                                     config.model_overrides.get("remat_policy") == AUTO)) if auto]


def score(config: ml_collections.ConfigDict, devices: Sequence[jax.Device], chip: Chip | None = None) -> list[Plan]:
    """Every candidate plan of `config` on `devices`, estimated: the fields set to auto vary, the
    others are kept (with nothing auto, the one plan the config names)."""
    from emu2_jax import optim, tasks  # pylint: disable=import-outside-toplevel

    chip = chip or chip_of(devices[0])
    policy = config.model_overrides.get("remat_policy", "none")
    probe = ml_collections.ConfigDict(config.to_dict(), type_safe=False)
    probe.model_overrides.remat_policy = "none" if policy == AUTO else policy
    task = tasks.create(probe)
    if not hasattr(task.model_cfg, "llm"):
        raise ValueError(f"--config.mesh_shape=auto / grad_accum_steps=0 / remat_policy=auto: automatic plans "
                         f"model the LLM stages; stage {config.stage!r} needs an explicit mesh_shape, "
                         f"grad_accum_steps and remat_policy")
    rules = sh.rules_with_overrides(config.sharding_rules)
    boxed = jax.eval_shape(task.model.init, jax.random.key(0), task.dummy_batch(1))["params"]
    is_trainable = optim.trainable_predicate(tuple(config.trainable), lora=task.lora, components=task.components)
    chips, batch = len(devices), config.global_batch_size
    tensors = tensor_sizes_allowed(boxed, rules, chips)
    policies = AUTO_POLICIES if policy == AUTO else (policy,)
    options = candidates(chips, batch, tensors, config.mesh_shape, config.grad_accum_steps, policies)
    if not options:
        raise ValueError(f"global_batch_size={batch} divides over no mesh of {chips} devices (tensor in {tensors}, "
                         f"mesh_shape={config.mesh_shape}); choose a batch divisible by the batch shards")
    flops = task.training_flops(None)
    params = nn.unbox(boxed)
    llm_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params.get("llm", {})))
    trainable_params = sum(math.prod(x.shape) for x in jax.tree.leaves(optim.split_params(params, is_trainable)[0]))
    cb = _bytes(task.model_cfg.llm.dtype)
    # The global batch arrives whole (all microbatches), split over the batch shards.
    batch_bytes = sum(math.prod(x.shape) * _bytes(x.dtype) for x in jax.tree.leaves(task.dummy_batch(batch)))
    states: dict[tuple[int, ...], float] = {}
    plans = []
    for mesh_shape, steps, remat in options:
        if mesh_shape not in states:
            states[mesh_shape] = state_bytes(boxed, is_trainable, sh.create_mesh(mesh_shape, devices), rules)
        data, fsdp, tensor = mesh_shape
        rows = batch // (data * fsdp * steps)
        kept, working = llm_activation_bytes(task.model_cfg, config, rows, tensor, remat,
                                             "visual" in config.trainable)
        act = kept + working
        memory = states[mesh_shape] + batch_bytes / (data * fsdp) + act + FIXED_GIB * GIB
        compute = flops * RECOMPUTE[remat] / (chips * chip.peak_tflops * 1e12) if chip else 0.0
        gather = (fsdp - 1) / fsdp * (2 * llm_params * cb + trainable_params * 4) / tensor
        all_reduce = 2 * (data - 1) / data * trainable_params * 4 / (fsdp * tensor)
        bandwidth = chip.ici_gbps * 1e9 if chip else math.inf
        comm = (steps * gather + all_reduce) / bandwidth
        # Exposed: each microbatch's first layer gather (nothing to hide it behind), the closing
        # data-parallel all-reduce, and whatever of the rest outlasts the compute.
        first = steps * gather / task.model_cfg.llm.num_layers / bandwidth
        exposed = first + all_reduce / bandwidth + max(0.0, comm - first - all_reduce / bandwidth - compute)
        plans.append(Plan(tuple(mesh_shape), steps, remat, rows, states[mesh_shape] / GIB,
                          batch_bytes / (data * fsdp) / GIB, act / GIB, memory / GIB, compute, comm, exposed,
                          compute + exposed))
    return plans


def choose(config: ml_collections.ConfigDict, devices: Sequence[jax.Device], chip: Chip | None = None,
           *, log: bool = True) -> Plan | None:
    """The plan for `config` on `devices`: the fastest that fits (None when nothing is auto)."""
    from emu2_jax import metrics  # pylint: disable=import-outside-toplevel

    if not unresolved_fields(config):
        return None
    chip = chip or chip_of(devices[0])
    plans = score(config, devices, chip)
    budget = HEADROOM * chip.hbm_gib if chip else math.inf
    fitting = [p for p in plans if p.memory_gib <= budget]
    if not fitting:
        smallest = min(plans, key=lambda p: p.memory_gib)
        raise ValueError(f"no plan fits {len(devices)} x {chip.platform} ({chip.hbm_gib:.0f} GiB HBM, "
                         f"{HEADROOM:.0%} usable): the smallest, {smallest.describe()}; use more chips or a smaller "
                         f"global_batch_size")
    # Step estimates within NEAR_TIE of the fastest count as equal (the model is not finer than
    # that); among those, fewer microbatches (each has overheads the model leaves out), then the
    # smallest memory (the most headroom: data parallelism replicates the state for little gain).
    fastest = min(p.step_s for p in fitting)
    best = min(fitting, key=lambda p: (p.step_s > fastest * NEAR_TIE, p.grad_accum_steps, round(p.memory_gib, 3),
                                       REMAT_POLICIES.index(p.remat_policy)))
    if log:
        flops = best.compute_s * len(devices) * chip.peak_tflops * 1e12 / RECOMPUTE[best.remat_policy] if chip else 0
        logging.info("Automatic plan on %d x %s: %s; roofline MFU %s (%d candidates, %d fit).", len(devices),
                     chip.platform if chip else devices[0].platform, best.describe(),
                     f"{metrics.mfu(flops, best.step_s, chip.peak_tflops * 1e12, len(devices)):.1%}" if chip
                     else "n/a", len(plans), len(fitting))
    return best


def apply(config: ml_collections.ConfigDict, devices: Sequence[jax.Device], chip: Chip | None = None
          ) -> tuple[ml_collections.ConfigDict, Plan | None]:
    """`config` with its automatic fields replaced by the chosen plan's (a copy; unchanged if none)."""
    plan = choose(config, devices, chip)
    if plan is None:
        return config, None
    resolved = ml_collections.ConfigDict(config.to_dict(), type_safe=False)  # "auto" -> a tuple
    resolved.mesh_shape = plan.mesh_shape
    resolved.grad_accum_steps = plan.grad_accum_steps
    resolved.model_overrides.remat_policy = plan.remat_policy
    return resolved, plan
