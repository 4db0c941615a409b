"""Logical axis names and the one place that maps them onto a device mesh.

Every parameter and main activation in `emu2_jax.models` carries logical axis names
(MaxText style). Only this module knows how those names land on the physical mesh axes
`data`, `fsdp` and `tensor` (docs/sharding.md). `LOGICAL_RULES` is the default table; a run
overrides entries of it with `config.sharding_rules` (see `rules_with_overrides`), and every function
here takes the rules in force.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Parameter axes.
EMBED = "embed"            # model width (LLM or vision tower)
MLP = "mlp"                # feed-forward hidden width
HEADS = "heads"            # query heads
KV_HEADS = "kv_heads"      # key/value heads (grouped-query attention)
HEAD_DIM = "head_dim"
VOCAB = "vocab"
LAYERS = "layers"          # the stacked (scanned) layer axis
VISION_EMBED = "vision_embed"  # encoder width as seen by projector / regression head
CONV_IN = "conv_in"        # convolution input channels
CONV_OUT = "conv_out"      # convolution output channels
CONV_SPATIAL = "conv_spatial"    # kernel height (flax forbids one name twice in a shape)
CONV_SPATIAL_W = "conv_spatial_w"  # kernel width
CONV_TEMPORAL = "conv_temporal"  # kernel extent over video frames
NORM = "norm"              # norm scales and biases
QUERIES = "queries"        # learned query tokens of Emu's Causal Transformer connector
POSITIONS = "positions"    # learned position embeddings
LORA_RANK = "lora_rank"    # LoRA adapter rank

# Activation axes: distinct names so that e.g. the activation batch axis and the
# parameter embed axis may both use `fsdp` without fighting over it.
ACT_BATCH = "act_batch"
ACT_LENGTH = "act_length"
ACT_EMBED = "act_embed"
ACT_HEADS = "act_heads"
ACT_KV_HEADS = "act_kv_heads"
ACT_HEAD_DIM = "act_head_dim"
ACT_MLP = "act_mlp"
ACT_VOCAB = "act_vocab"

Rules = tuple[tuple[str, Any], ...]  # (logical name, mesh axis | tuple of mesh axes | None)

# (logical name, mesh axes) pairs; the first rule whose mesh axes are still free wins.
LOGICAL_RULES: Rules = (
    (ACT_BATCH, ("data", "fsdp")),
    (ACT_LENGTH, None),
    (ACT_EMBED, None),
    (ACT_HEADS, "tensor"),
    (ACT_KV_HEADS, "tensor"),
    (ACT_HEAD_DIM, None),
    (ACT_MLP, "tensor"),
    (ACT_VOCAB, "tensor"),
    (EMBED, "fsdp"),
    (VISION_EMBED, "fsdp"),
    (MLP, "tensor"),
    (HEADS, "tensor"),
    (KV_HEADS, "tensor"),
    (HEAD_DIM, None),
    (VOCAB, "tensor"),
    (LAYERS, None),
    (CONV_IN, None),
    (CONV_OUT, "fsdp"),
    (CONV_SPATIAL, None),
    (CONV_SPATIAL_W, None),
    (CONV_TEMPORAL, None),
    (NORM, None),
    (QUERIES, None),
    (POSITIONS, None),
    (LORA_RANK, None),
)


def rules_with_overrides(overrides: Sequence[Sequence[Any]] = ()) -> Rules:
    """LOGICAL_RULES with the entries named in `overrides` replaced, e.g. from the config

        --config.sharding_rules="(('act_batch', ('data', 'fsdp', 'tensor')), ('mlp', None))"

    Each override is (logical name, mesh axis | tuple of mesh axes | None); an unknown logical name
    or mesh axis is an error naming it."""
    known = {name for name, _ in LOGICAL_RULES}
    replaced = {}
    for entry in overrides:
        if len(entry) != 2:
            raise ValueError(f"sharding_rules entry {tuple(entry)!r}: expected (logical name, mesh axes)")
        name, axes = entry[0], entry[1]
        axes = tuple(axes) if isinstance(axes, (list, tuple)) else axes
        unknown = [a for a in (axes if isinstance(axes, tuple) else (axes,)) if a is not None and a not in MESH_AXES]
        if name not in known or unknown:
            raise ValueError(f"sharding_rules entry ({name!r}, {axes!r}): "
                             + (f"unknown logical axis; known: {sorted(known)}" if name not in known else
                                f"unknown mesh axis {unknown[0]!r}; mesh axes: {MESH_AXES}"))
        replaced[name] = axes
    return tuple((name, replaced.get(name, axes)) for name, axes in LOGICAL_RULES)


def resolve_mesh_shape(mesh_shape: Sequence[int] | str, num_devices: int) -> tuple[int, ...]:
    """(data, fsdp, tensor) from a sequence or a string such as "16,4,1" or "(1,-1,1)"; one entry may
    be -1 (the remaining devices). ValueError naming `mesh_shape` if it does not fit `num_devices`."""
    if isinstance(mesh_shape, str):
        try:
            shape = [int(x) for x in mesh_shape.strip().strip("()[]").split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"mesh_shape={mesh_shape!r}: expected 'auto' or data,fsdp,tensor integers") from None
    else:
        shape = [int(x) for x in mesh_shape]
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh_shape={mesh_shape} must have {len(MESH_AXES)} entries {MESH_AXES}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh_shape={mesh_shape}: at most one entry may be -1")
    if -1 in shape:
        known = int(np.prod([s for s in shape if s != -1]))
        if num_devices % known:
            raise ValueError(f"mesh_shape={mesh_shape} does not divide {num_devices} devices")
        shape[shape.index(-1)] = num_devices // known
    if int(np.prod(shape)) != num_devices:
        raise ValueError(f"mesh_shape={tuple(shape)} needs {int(np.prod(shape))} devices, have {num_devices}")
    return tuple(shape)


def create_mesh(mesh_shape: Sequence[int] | str, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor) (`mesh_shape` as `resolve_mesh_shape` takes it)."""
    devices = list(devices if devices is not None else jax.devices())
    if mesh_shape == "auto":
        raise ValueError("mesh_shape='auto' must be resolved first (emu2_jax.plan.apply)")
    return Mesh(np.asarray(devices).reshape(resolve_mesh_shape(mesh_shape, len(devices))), MESH_AXES)


def logical_to_sharding(logical_tree, mesh: Mesh, rules=LOGICAL_RULES):
    """Maps a tree of logical PartitionSpecs (e.g. from `nn.get_partition_spec`) to NamedShardings."""
    specs = nn.logical_to_mesh(logical_tree, rules)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def _replicate_nondividing(shape: tuple[int, ...], sharding: NamedSharding) -> NamedSharding:
    """`sharding` without the mesh axes that do not divide their dimension (e.g. a UNet's 4-channel
    output bias over 8 fsdp shards): such a dimension is replicated instead."""
    spec = []
    for size, axes in zip(shape, tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))):
        spec.append(axes if size % shard_count(sharding.mesh, axes) == 0 else None)
    return NamedSharding(sharding.mesh, PartitionSpec(*spec))


def param_shardings(boxed_variables, mesh: Mesh, rules=LOGICAL_RULES):
    """NamedShardings for a tree of logically partitioned variables (e.g. `jax.eval_shape` of
    `model.init`), replicating any dimension its mesh axes do not divide."""
    shardings = logical_to_sharding(nn.get_partition_spec(boxed_variables), mesh, rules)
    return jax.tree.map(lambda leaf, sharding: _replicate_nondividing(leaf.shape, sharding),
                        nn.unbox(boxed_variables), shardings)


def shard_count(mesh: Mesh | jax.sharding.AbstractMesh, axes: str | tuple[str, ...] | None) -> int:
    """How many ways one PartitionSpec entry (a mesh axis, a tuple of them or None) splits a dimension."""
    names = axes if isinstance(axes, tuple) else (axes,) if axes else ()
    return int(np.prod([mesh.shape[a] for a in names]))


def batch_shards(mesh: Mesh, rules: Rules = LOGICAL_RULES) -> int:
    """How many ways the batch is split on `mesh`: the product of the mesh axes that the activation
    batch axis maps to. Batch-size checks and batch placement both follow it."""
    return shard_count(mesh, nn.logical_to_mesh_axes((ACT_BATCH,), rules)[0])


def batch_sharding(mesh: Mesh, rules: Rules = LOGICAL_RULES, *, leading_accum: bool = True) -> NamedSharding:
    """Training batches arrive as [grad_accum_steps, rows, ...] (`leading_accum`), prompts as
    [rows, ...]; rows follow the activation batch rule."""
    spec = PartitionSpec(None, ACT_BATCH) if leading_accum else PartitionSpec(ACT_BATCH)
    return logical_to_sharding(spec, mesh, rules)


def with_logical_rules(fn: Callable, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> Callable:
    """Traces `fn` with the logical-axis `rules` and `mesh` (abstractly) active; both are read at
    trace time. Parameters and batches are placed by the jit shardings; Flax turns the models'
    activation annotations (`nn.with_logical_constraint`) into sharding constraints only when a mesh
    is in context."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with nn.logical_axis_rules(rules), jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)
    return wrapped
