"""The optimizer of every training stage.

AdamW with one peak learning rate per parameter group (`visual` encoder, `projector` = connector +
project_down, `llm`; the visual-decoder stage's `unet`), warmup then cosine / linear / constant decay,
and global-norm clipping. Only the trainable parameters are handed to the optimizer: frozen
components (and, with LoRA, every LLM weight except the adapters) keep no optimizer state and are
never differentiated.

    trainable, frozen = split_params(params, is_trainable)
    tx, schedules = create_optimizer(config.optimizer, total_steps)
    opt_state = tx.init(trainable)
    params = merge_params(new_trainable, frozen)
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util

from emu2_jax.models.emu2 import COMPONENTS

PyTree = Any
Path = tuple[str, ...]

# Parameter group (one peak learning rate each) of every top-level component: Emu2Model's, then the
# visual decoders' (emu2_jax.tasks.decoder / video_decoder: their encoder is `visual` too; the video
# decoder's condition projection `cond_proj` is a projector).
GROUP_OF_COMPONENT = {"visual": "visual", "connector": "projector", "project_down": "projector", "llm": "llm",
                      "unet": "unet", "vae": "vae", "cond_proj": "projector"}
GROUPS = ("visual", "projector", "llm", "unet", "vae")
LORA_PARAMS = ("lora_a", "lora_b")
# Leaf names that get weight decay: matrices, not norms, biases, embeddings or position tables.
_DECAYED = ("kernel",) + LORA_PARAMS


def trainable_predicate(trainable_components: Sequence[str], lora: bool,
                        components: Sequence[str] = COMPONENTS) -> Callable[[Path], bool]:
    """Says from a parameter path whether it is trained.

    trainable_components: top-level names (of `components`, the model's) that train; the rest is frozen.
    lora: train only the LoRA adapters inside `llm` (the LLM's own weights stay frozen).
    """
    unknown = set(trainable_components) - set(components)
    if unknown:
        raise ValueError(f"unknown trainable components {sorted(unknown)}; expected a subset of {tuple(components)}")

    def is_trainable(path: Path) -> bool:
        if path[0] not in trainable_components:
            return False
        return not (lora and path[0] == "llm" and path[-1] not in LORA_PARAMS)

    return is_trainable


def split_params(params: Mapping[str, Any], is_trainable: Callable[[Path], bool]) -> tuple[dict, dict]:
    """(trainable, frozen): two disjoint nested dicts that `merge_params` puts back together."""
    flat = traverse_util.flatten_dict(params)
    trainable = {k: v for k, v in flat.items() if is_trainable(k)}
    frozen = {k: v for k, v in flat.items() if not is_trainable(k)}
    if not trainable:
        raise ValueError("no trainable parameters: check `trainable` (and LoRA) in the config")
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge_params(trainable: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict:
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(frozen),
                                         **traverse_util.flatten_dict(trainable)})


def _tree_of_paths(tree: PyTree, fn: Callable[[Path], Any]) -> PyTree:
    """fn(path of dict keys) at every leaf; works inside optax wrappers (masked nodes have no leaves)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: fn(tuple(k.key for k in path)), tree)


def param_groups(tree: PyTree) -> PyTree:
    """The learning-rate group ('visual', 'projector' or 'llm') of every leaf of a params (sub)tree."""
    return _tree_of_paths(tree, lambda path: GROUP_OF_COMPONENT[path[0]])


def decay_mask(tree: PyTree) -> PyTree:
    return _tree_of_paths(tree, lambda path: path[-1] in _DECAYED)


def warmup_steps(config: ml_collections.ConfigDict, total_steps: int) -> int:
    """`warmup_steps` when set (>= 0), else `warmup_ratio` of the run."""
    if config.warmup_steps >= 0:
        return int(config.warmup_steps)
    return int(round(config.warmup_ratio * total_steps))


def make_schedule(config: ml_collections.ConfigDict, peak: float, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `peak`, then `decay` (cosine | linear | constant) to peak * end_factor."""
    warmup = min(warmup_steps(config, total_steps), total_steps)
    end = peak * config.end_lr_factor
    remaining = max(total_steps - warmup, 1)
    if config.decay == "cosine":
        decay = optax.cosine_decay_schedule(peak, remaining, alpha=config.end_lr_factor)
    elif config.decay == "linear":
        decay = optax.linear_schedule(peak, end, remaining)
    elif config.decay == "constant":
        decay = optax.constant_schedule(peak)
    else:
        raise ValueError(f"decay={config.decay!r}; expected 'cosine', 'linear' or 'constant'")
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def create_optimizer(config: ml_collections.ConfigDict, total_steps: int
                     ) -> tuple[optax.GradientTransformation, dict[str, optax.Schedule]]:
    """AdamW over the trainable subtree, one schedule per group; returns (tx, {group: schedule}).

    config: the stage config's `optimizer` block (b1, b2, eps, weight_decay, grad_clip_norm,
    learning_rate.{group: peak} for the groups (GROUPS) of the trainable components, warmup_steps /
    warmup_ratio, decay, end_lr_factor).
    """
    unknown = set(config.learning_rate) - set(GROUPS)
    if unknown:
        raise ValueError(f"optimizer.learning_rate has unknown group(s) {sorted(unknown)}; groups: {GROUPS}")
    schedules = {g: make_schedule(config, float(config.learning_rate[g]), total_steps) for g in config.learning_rate}
    per_group = {
        g: optax.adamw(schedules[g], b1=config.b1, b2=config.b2, eps=config.eps,
                       weight_decay=config.weight_decay, mask=decay_mask)
        for g in schedules
    }
    chain = []
    if config.grad_clip_norm > 0:
        chain.append(optax.clip_by_global_norm(config.grad_clip_norm))
    chain.append(optax.transforms.partition(per_group, param_groups))
    return optax.chain(*chain), schedules


def update_norms(loss: jax.Array, grads: PyTree, new_params: PyTree
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(grad_norm, param_norm, finite): the global L2 norms of a step's gradients and of the params
    it would write, and whether the step may be applied (loss and both norms finite)."""
    grad_norm, param_norm = optax.tree.norm(grads), optax.tree.norm(new_params)
    # A finite norm means every element is finite (a NaN or inf propagates through the sum of
    # squares). One scalar per tree, not one per leaf: XLA copies a per-leaf and-chain into every
    # leaf's select that uses the flag, O(leaves^2) ops (the tiny video decoder's 476 leaves: a
    # 1.5M-line program, 6 min to compile).
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
    return grad_norm, param_norm, finite


def opt_state_shardings(abstract_opt_state: PyTree, param_shardings: Mapping[str, Any],
                        replicated: jax.sharding.Sharding) -> PyTree:
    """Shardings for an optimizer state: each per-parameter leaf (Adam's mu, nu) is sharded like its
    parameter, found by the trailing dict keys of its path; counts and other leaves are replicated."""
    by_path = traverse_util.flatten_dict(param_shardings)

    def pick(path, leaf):
        keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
        for i in range(len(keys)):
            if keys[i:] in by_path and leaf.ndim > 0:
                return by_path[keys[i:]]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)
