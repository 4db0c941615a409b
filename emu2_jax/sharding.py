"""Logical axis names and the one place that maps them onto a device mesh.

Every parameter and main activation in `emu2_jax.models` carries logical axis names
(MaxText style). Only this module knows how those names land on the physical mesh axes
`data`, `fsdp` and `tensor`; changing a parallelism strategy means editing `LOGICAL_RULES`.
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from flax import linen as nn

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

# (logical name, mesh axes) pairs; the first rule whose mesh axes are still free wins.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
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
    (NORM, None),
    (QUERIES, None),
    (POSITIONS, None),
    (LORA_RANK, None),
)


def create_mesh(mesh_shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor); one entry of `mesh_shape` may be -1 (fill)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = list(mesh_shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh_shape={mesh_shape} must have {len(MESH_AXES)} entries {MESH_AXES}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh_shape={mesh_shape}: at most one entry may be -1")
    if -1 in shape:
        known = int(np.prod([s for s in shape if s != -1]))
        if len(devices) % known:
            raise ValueError(f"mesh_shape={mesh_shape} does not divide {len(devices)} devices")
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh_shape={tuple(shape)} needs {int(np.prod(shape))} devices, have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


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
        names = axes if isinstance(axes, tuple) else (axes,) if axes else ()
        spec.append(axes if size % int(np.prod([sharding.mesh.shape[a] for a in names])) == 0 else None)
    return NamedSharding(sharding.mesh, PartitionSpec(*spec))


def param_shardings(boxed_variables, mesh: Mesh, rules=LOGICAL_RULES):
    """NamedShardings for a tree of logically partitioned variables (e.g. `jax.eval_shape` of
    `model.init`), replicating any dimension its mesh axes do not divide."""
    shardings = logical_to_sharding(nn.get_partition_spec(boxed_variables), mesh, rules)
    return jax.tree.map(lambda leaf, sharding: _replicate_nondividing(leaf.shape, sharding),
                        nn.unbox(boxed_variables), shardings)
