"""The optimizer: parameter groups and their learning rates, frozen / LoRA selection, schedules."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from emu2_jax import optim
from emu2_jax import sharding as sh


def _config(**overrides):
    config = ml_collections.ConfigDict(dict(
        b1=0.9, b2=0.95, eps=1e-12, weight_decay=0.0, grad_clip_norm=0.0,
        learning_rate=dict(visual=0.1, projector=0.2, llm=0.3),
        warmup_steps=0, warmup_ratio=0.0, decay="constant", end_lr_factor=0.0))
    config.update(overrides)
    return config


def _params():
    return {
        "visual": {"blocks": {"fc": {"kernel": jnp.full((2, 3), 1.0), "bias": jnp.full((3,), 1.0)}},
                   "pos_embed": jnp.full((1, 5, 3), 1.0)},
        "connector": {"project_up": {"kernel": jnp.full((3, 4), 1.0)}},
        "llm": {"embed_tokens": {"embedding": jnp.full((7, 4), 1.0)},
                "layers": {"attn": {"q": {"kernel": jnp.full((2, 4, 4), 1.0), "lora_a": jnp.full((2, 4, 2), 1.0),
                                          "lora_b": jnp.full((2, 2, 4), 1.0)}},
                           "input_norm": {"scale": jnp.full((2, 4), 1.0)}}},
        "project_down": {"kernel": jnp.full((4, 3), 1.0)},
    }


def _one_update(config, params, grads):
    tx, _ = optim.create_optimizer(config, total_steps=100)
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates


def test_each_group_gets_its_peak_learning_rate():
    trainable, frozen = optim.split_params(_params(), optim.trainable_predicate(optim.COMPONENTS, lora=False))
    assert not frozen
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.5), trainable)
    updates = _one_update(_config(), trainable, grads)
    # Adam's first step moves every weight by exactly lr * sign(gradient).
    expected_lr = {"visual": 0.1, "connector": 0.2, "project_down": 0.2, "llm": 0.3}
    for component, lr in expected_lr.items():
        for leaf in jax.tree.leaves(updates[component]):
            np.testing.assert_allclose(leaf, -lr, rtol=1e-6)


def test_weight_decay_only_on_matrices():
    trainable, _ = optim.split_params(_params(), optim.trainable_predicate(optim.COMPONENTS, lora=False))
    grads = jax.tree.map(jnp.zeros_like, trainable)
    updates = _one_update(_config(weight_decay=0.5), trainable, grads)
    flat = {"/".join(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(updates)}
    for name, leaf in flat.items():
        decayed = name.endswith(("kernel", "lora_a", "lora_b"))
        lr = {"visual": 0.1, "connector": 0.2, "project_down": 0.2, "llm": 0.3}[name.split("/")[0]]
        np.testing.assert_allclose(leaf, -lr * 0.5 if decayed else 0.0, rtol=1e-6, err_msg=name)


def test_frozen_components_and_lora_selection():
    params = _params()
    trainable, frozen = optim.split_params(params, optim.trainable_predicate(("connector", "llm"), lora=False))
    assert set(trainable) == {"connector", "llm"} and set(frozen) == {"visual", "project_down"}

    trainable, frozen = optim.split_params(params, optim.trainable_predicate(("llm",), lora=True))
    assert jax.tree_util.tree_structure(trainable) == jax.tree_util.tree_structure(
        {"llm": {"layers": {"attn": {"q": {"lora_a": 0, "lora_b": 0}}}}})
    assert "q" in frozen["llm"]["layers"]["attn"] and "kernel" in frozen["llm"]["layers"]["attn"]["q"]
    merged = optim.merge_params(trainable, frozen)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(params)

    with pytest.raises(ValueError, match="unknown trainable"):
        optim.trainable_predicate(("encoder",), lora=False)
    with pytest.raises(ValueError, match="no trainable"):
        optim.split_params({"visual": {"k": jnp.ones(2)}}, optim.trainable_predicate(("llm",), lora=False))


def test_optimizer_state_only_for_trainable_leaves():
    trainable, _ = optim.split_params(_params(), optim.trainable_predicate(("llm",), lora=True))
    tx, _ = optim.create_optimizer(_config(), total_steps=10)
    state_elements = sum(x.size for x in jax.tree.leaves(tx.init(trainable)))
    adapter_elements = 2 * 4 * 2 + 2 * 2 * 4
    counts = 3 * 2  # Adam count and schedule count per group
    assert state_elements == 2 * adapter_elements + counts


_COS = 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 2 / 8))  # 2 of 8 decay steps, alpha 0.1


@pytest.mark.parametrize("decay, expected", [
    ("cosine", [0.0, 0.5, 1.0, _COS, 0.55, 0.1]),
    ("linear", [0.0, 0.5, 1.0, 0.775, 0.55, 0.1]),
    ("constant", [0.0, 0.5, 1.0, 1.0, 1.0, 1.0]),
])
def test_schedules(decay, expected):
    config = _config(decay=decay, warmup_ratio=0.2, warmup_steps=-1, end_lr_factor=0.1)
    schedule = optim.make_schedule(config, 1.0, total_steps=10)
    got = [float(schedule(s)) for s in (0, 1, 2, 4, 6, 10)]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    assert optim.warmup_steps(_config(warmup_steps=7, warmup_ratio=0.5), 100) == 7


def test_clipping_bounds_the_global_norm():
    params = {"llm": {"w": {"kernel": jnp.zeros((4,))}}}
    grads = {"llm": {"w": {"kernel": jnp.array([30.0, 40.0, 0.0, 0.0])}}}
    tx, _ = optim.create_optimizer(_config(grad_clip_norm=1.0, b1=0.0, b2=0.0, eps=1e-3), total_steps=10)
    updates, _ = tx.update(grads, tx.init(params), params)
    # With b1 = b2 = 0, Adam's update is g / (|g| + eps): the clipped g = (0.6, 0.8) gives 0.3 * g / (|g| + 1e-3).
    clipped = np.array([0.6, 0.8, 0.0, 0.0])
    np.testing.assert_allclose(updates["llm"]["w"]["kernel"], -0.3 * clipped / (clipped + 1e-3), rtol=1e-5)


def test_opt_state_sharded_like_params():
    mesh = sh.create_mesh((1, 8, 1))
    params = {"llm": {"w": {"kernel": jnp.zeros((8, 4))}}, "connector": {"b": jnp.zeros((8,))}}
    shardings = {"llm": {"w": {"kernel": NamedSharding(mesh, P("fsdp", None))}},
                 "connector": {"b": NamedSharding(mesh, P())}}
    tx, _ = optim.create_optimizer(_config(), total_steps=10)
    replicated = NamedSharding(mesh, P())
    out = optim.opt_state_shardings(jax.eval_shape(tx.init, params), shardings, replicated)
    flat = {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): s
            for path, s in jax.tree_util.tree_leaves_with_path(out)}
    kernel_states = [s for name, s in flat.items() if name.endswith("llm/w/kernel")]
    assert len(kernel_states) == 2 and all(s.spec == P("fsdp", None) for s in kernel_states)  # mu, nu
    assert all(s == replicated for name, s in flat.items() if not name.endswith("llm/w/kernel"))


def test_update_norms_flag_any_nonfinite_element():
    grads = {"a": jnp.array([3.0, 0.0]), "b": {"c": jnp.array([4.0])}}
    params = {"a": jnp.ones(2), "b": {"c": jnp.array([2.0])}}
    grad_norm, param_norm, finite = optim.update_norms(jnp.float32(1.0), grads, params)
    np.testing.assert_allclose([grad_norm, param_norm], [5.0, np.sqrt(6.0)], rtol=1e-6)
    assert bool(finite)
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
        poisoned = {"a": jnp.array([1.0, bad]), "b": params["b"]}
        assert not bool(optim.update_norms(jnp.float32(1.0), grads, poisoned)[2]), bad
        assert not bool(optim.update_norms(jnp.float32(1.0), poisoned, params)[2]), bad
        assert not bool(optim.update_norms(jnp.float32(bad), grads, params)[2]), bad


def test_skipping_a_step_compiles_to_a_program_linear_in_leaves():
    """The skip (every leaf kept or replaced on one flag) must not copy a per-leaf check into each
    leaf: at 4x the leaves the program is about 4x as long, not 16x."""
    def program_lines(leaves: int) -> int:
        def step(params, grads):
            new = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
            finite = optim.update_norms(jnp.float32(0.0), grads, new)[2]
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, params)
        tree = {f"w{i}": jnp.ones((4,)) for i in range(leaves)}
        return jax.jit(step).lower(tree, tree).compile().as_text().count("\n")

    small, large = program_lines(40), program_lines(160)
    assert large < 6 * small, (small, large)
