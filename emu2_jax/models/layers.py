"""Building blocks shared by every model file: dense layers, norms and attention,
all with logical axis names on their parameters."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from emu2_jax import sharding as sh

Dtype = Any
Initializer = Callable[..., jax.Array]

default_kernel_init = nn.initializers.lecun_normal()


class _LogicallyPartitioned(nn.LogicallyPartitioned):
    """`nn.LogicallyPartitioned` that skips the sharding constraint while a value does not yet have
    one dimension per name: `nn.DenseGeneral` unboxes multi-axis kernels while still flattened to 2D."""

    def unbox(self, apply_constraint: bool = True) -> Any:
        return super().unbox(apply_constraint and jnp.ndim(self.value) == len(self.names))


def partitioned(init: Initializer, axes: Sequence[str | None]) -> Initializer:
    """Wraps `init` so the parameter it makes carries the logical axis names `axes`."""
    axes = tuple(axes)
    return lambda *args, **kwargs: _LogicallyPartitioned(init(*args, **kwargs), axes)


def dense(
    features: int | tuple[int, ...],
    kernel_axes: Sequence[str | None],
    *,
    axis: int | tuple[int, ...] = -1,
    use_bias: bool = False,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    kernel_init: Initializer = default_kernel_init,
    name: str | None = None,
) -> nn.DenseGeneral:
    """`nn.DenseGeneral` whose kernel (in axes..., out axes...) and bias carry logical names.

    `features` may be a tuple (e.g. (heads, head_dim)); `axis` selects the contracted input axes.
    """
    n_out = len(features) if isinstance(features, tuple) else 1
    return nn.DenseGeneral(
        features=features,
        axis=axis,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=partitioned(kernel_init, kernel_axes),
        bias_init=partitioned(nn.initializers.zeros_init(), tuple(kernel_axes)[-n_out:]),
        name=name,
    )


def layer_norm(*, epsilon: float = 1e-6, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, name: str | None = None) -> nn.LayerNorm:
    """LayerNorm (statistics in float32) with `scale`/`bias` on the `norm` axis."""
    return nn.LayerNorm(
        epsilon=epsilon,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=partitioned(nn.initializers.ones_init(), (sh.NORM,)),
        bias_init=partitioned(nn.initializers.zeros_init(), (sh.NORM,)),
        name=name,
    )


class RMSNorm(nn.Module):
    """LLaMA RMSNorm: normalise in float32, cast back, then scale (as transformers does)."""
    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", partitioned(nn.initializers.ones_init(), (sh.NORM,)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
        return normed.astype(self.dtype) * scale.astype(self.dtype)


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | None = None,
    *,
    scale: float | None = None,
    dtype: Dtype = jnp.float32,
) -> jax.Array:
    """Softmax attention with float32 logits; supports grouped-query attention.

    query [B, T, H, D]; key, value [B, S, K, D] with H a multiple of K;
    mask broadcastable to [B, H, T, S] (True = attend). Returns [B, T, H, D].
    """
    batch, q_len, n_heads, head_dim = query.shape
    n_kv = key.shape[2]
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads are not a multiple of {n_kv} key/value heads")
    scale = head_dim ** -0.5 if scale is None else scale
    group = n_heads // n_kv
    q = query.reshape(batch, q_len, n_kv, group, head_dim)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, key, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        mask = jnp.broadcast_to(mask, (batch, n_heads, q_len, key.shape[1]))
        mask = mask.reshape(batch, n_kv, group, q_len, key.shape[1])
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", weights, value.astype(dtype))
    return out.reshape(batch, q_len, n_heads, head_dim)


def causal_mask(q_len: int, kv_len: int, q_offset: jax.Array | int = 0) -> jax.Array:
    """[1, 1, T, S] boolean mask: query i (at absolute position q_offset + i) sees keys <= it."""
    q_pos = jnp.arange(q_len)[:, None] + q_offset
    k_pos = jnp.arange(kv_len)[None, :]
    return (k_pos <= q_pos)[None, None]


# Names of the activations a block tags with `checkpoint_name` (the LLM's and the vision tower's
# attention and MLP), so that a remat policy can keep them by name, MaxText style.
QUERY_PROJ, KEY_PROJ, VALUE_PROJ = "query_proj", "key_proj", "value_proj"
OUT_PROJ = "out_proj"    # attention output projection
MLP_OUT = "mlp_out"      # MLP output projection

_save = jax.checkpoint_policies.save_only_these_names
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "none": None,                                   # keep every activation (no rematerialisation)
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,   # keep matmul outputs, recompute the rest
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Keep the projections; recompute attention scores and the MLP's hidden activation.
    "minimal": _save(QUERY_PROJ, KEY_PROJ, VALUE_PROJ, OUT_PROJ, MLP_OUT),
    "save_qkv_proj": _save(QUERY_PROJ, KEY_PROJ, VALUE_PROJ),  # keep q, k, v; recompute the rest
}


def scan_blocks(
    block_cls: type[nn.Module],
    *,
    num_layers: int,
    remat_policy: str,
    in_axes: Any = nn.broadcast,
    static_argnums: tuple[int, ...] = (),
) -> type[nn.Module]:
    """`nn.scan` over `num_layers` copies of `block_cls`, optionally wrapped in `nn.remat`.

    The block's `__call__(carry, *args)` must return `(carry, None)`. Parameters (and any
    `cache` variables) get a leading layer axis named `layers`. `static_argnums` counts
    arguments after `self` (as `nn.remat` does).
    """
    if remat_policy not in REMAT_POLICIES:
        raise ValueError(f"remat_policy={remat_policy!r}; expected one of {sorted(REMAT_POLICIES)}")
    if remat_policy != "none":
        block_cls = nn.remat(block_cls, policy=REMAT_POLICIES[remat_policy], prevent_cse=False,
                             static_argnums=static_argnums)
    return nn.scan(
        block_cls,
        variable_axes={"params": 0, "cache": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=in_axes,
        length=num_layers,
        metadata_params={nn.PARTITION_NAME: sh.LAYERS},
    )
