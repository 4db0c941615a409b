"""LlamaDecoder: parity with transformers, KV-cache decoding, packing, LoRA, sharding metadata, remat."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn

from emu2_jax.convert.llama import convert_llama
from emu2_jax.models import llama
from emu2_jax.models.llama import LlamaConfig, LlamaDecoder, init_cache, unstack_layers
from tests.torch_refs import hf_llama, state_dict_np

TOL = 1e-4


def tiny_config(**overrides) -> LlamaConfig:
    base = dict(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4,
                intermediate_size=112, rms_norm_eps=1e-5, rope_theta=500.0, max_cache_length=24)
    return LlamaConfig(**{**base, **overrides})


def arange_positions(batch: int, length: int) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))


def init_params(config: LlamaConfig, seed: int = 0, length: int = 4):
    tokens = jnp.zeros((1, length), jnp.int32)
    return LlamaDecoder(config).init(jax.random.key(seed), tokens, arange_positions(1, length),
                                     method=LlamaDecoder.forward)


@functools.partial(jax.jit, static_argnums=0)
def forward(config: LlamaConfig, params, tokens, positions=None, segment_ids=None) -> jax.Array:
    positions = arange_positions(*tokens.shape) if positions is None else positions
    return LlamaDecoder(config).apply({"params": params}, tokens, positions, segment_ids,
                                      method=LlamaDecoder.forward)


@pytest.mark.parametrize("num_kv_heads", [4, 2], ids=["mha", "gqa"])
def test_llama_logits_parity(num_kv_heads):
    config = tiny_config(num_kv_heads=num_kv_heads)
    hf = hf_llama(config, seed=num_kv_heads)
    params = convert_llama(state_dict_np(hf), config)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 16))
    with torch.no_grad():
        ref_logits = hf(torch.from_numpy(tokens)).logits.numpy()
        ref_hidden = hf.model(torch.from_numpy(tokens)).last_hidden_state.numpy()

    model = LlamaDecoder(config)
    positions = arange_positions(2, 16)
    hidden = model.apply({"params": params}, model.apply({"params": params}, jnp.asarray(tokens),
                                                           method=LlamaDecoder.embed), positions)
    logits = forward(config, params, jnp.asarray(tokens))
    assert logits.dtype == jnp.float32
    assert np.max(np.abs(np.asarray(hidden) - ref_hidden)) <= TOL
    assert np.max(np.abs(np.asarray(logits) - ref_logits)) <= TOL
    assert np.std(ref_logits) > 0.5  # the comparison is not between near-zero tensors
    # rope_theta matters: the default theta would not match this checkpoint.
    other_theta = forward(dataclasses.replace(config, rope_theta=10000.0), params, jnp.asarray(tokens))
    assert np.max(np.abs(np.asarray(other_theta) - ref_logits)) > 1e-2


def test_decode_matches_full_forward():
    config = tiny_config(num_kv_heads=2)
    params = nn.unbox(init_params(config))["params"]
    rng = np.random.default_rng(1)
    length = 12
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (2, length)), jnp.int32)
    # Row 1 is left-padded by 3 slots; its RoPE positions start at 0 on the first real token.
    segment_ids = jnp.asarray([[1] * length, [0] * 3 + [1] * (length - 3)], jnp.int32)
    positions = jnp.asarray([list(range(length)), [0] * 3 + list(range(length - 3))], jnp.int32)
    full = forward(config, params, tokens, positions, segment_ids)

    def step(m, tokens, positions, segment_ids, cache):
        hidden, cache = m.decode(m.embed(tokens), positions, segment_ids, cache)
        return m.logits(hidden), cache

    decode_step = jax.jit(functools.partial(LlamaDecoder(config).apply, method=step))
    cache = init_cache(config, batch_size=2)
    assert len(cache["layers"]) == config.num_layers
    assert cache["layers"][0]["key"].shape == (2, 2, config.max_cache_length, 16)  # head-major
    # Prefill 5, then a second prefill chunk of 3, then one token at a time.
    chunks = [(0, 5), (5, 8)] + [(i, i + 1) for i in range(8, length)]
    for start, stop in chunks:
        logits, cache = decode_step({"params": params}, tokens[:, start:stop], positions[:, start:stop],
                                    segment_ids[:, start:stop], cache)
        assert int(cache["index"]) == stop
        real = np.asarray(segment_ids[:, start:stop]) != 0
        diff = np.abs(np.asarray(logits) - np.asarray(full[:, start:stop]))[real]
        assert diff.max() <= TOL, (start, stop, diff.max())


def test_packing_matches_separate_sequences():
    config = tiny_config(num_kv_heads=2)
    params = nn.unbox(init_params(config))["params"]
    rng = np.random.default_rng(2)
    seq_a = rng.integers(0, config.vocab_size, 5)
    seq_b = rng.integers(0, config.vocab_size, 7)
    packed = jnp.asarray(np.concatenate([seq_a, seq_b, [0, 0]])[None], jnp.int32)
    segment_ids = jnp.asarray([[1] * 5 + [2] * 7 + [0] * 2], jnp.int32)
    positions = jnp.asarray([list(range(5)) + list(range(7)) + [0, 0]], jnp.int32)
    logits = np.asarray(forward(config, params, packed, positions, segment_ids))
    alone_a = np.asarray(forward(config, params, jnp.asarray(seq_a[None], jnp.int32)))
    alone_b = np.asarray(forward(config, params, jnp.asarray(seq_b[None], jnp.int32)))
    assert np.max(np.abs(logits[:, :5] - alone_a)) <= TOL
    assert np.max(np.abs(logits[:, 5:12] - alone_b)) <= TOL
    # Without segment ids, sequence b would attend to a: the outputs must differ.
    unpacked = np.asarray(forward(config, params, packed, positions))
    assert np.max(np.abs(unpacked[:, 5:12] - alone_b)) > 1e-3


def test_lora_zero_and_merged():
    rank, alpha = 4, 8.0
    config = tiny_config(num_kv_heads=2)
    lora_config = dataclasses.replace(config, lora_rank=rank, lora_alpha=alpha)
    params = nn.unbox(init_params(lora_config))["params"]
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, config.vocab_size, (2, 10)), jnp.int32)
    attn = params["layers"]["attn"]
    base_params = jax.tree.map(lambda x: x, params)
    base_params["layers"]["attn"] = {name: {"kernel": attn[name]["kernel"]} for name in attn}

    assert all(np.all(attn[name]["lora_b"] == 0) for name in attn)
    assert all(np.std(attn[name]["lora_a"]) > 0 for name in attn)
    np.testing.assert_array_equal(forward(lora_config, params, tokens), forward(config, base_params, tokens))

    keys = jax.random.split(jax.random.key(4), 4)
    merged = jax.tree.map(lambda x: x, base_params)
    for key, name in zip(keys, ["q", "k", "v", "o"]):
        b = 0.3 * jax.random.normal(key, attn[name]["lora_b"].shape)
        params["layers"]["attn"][name]["lora_b"] = b
        a = attn[name]["lora_a"]
        if name == "o":   # a [N, H, hd, r], b [N, r, D]
            delta = jnp.einsum("nhkr,nrd->nhkd", a, b)
        else:             # a [N, D, r], b [N, r, heads, hd]
            delta = jnp.einsum("ndr,nrhk->ndhk", a, b)
        merged["layers"]["attn"][name] = {"kernel": attn[name]["kernel"] + (alpha / rank) * delta}
    with_lora = forward(lora_config, params, tokens)
    assert np.max(np.abs(with_lora - forward(config, base_params, tokens))) > 1e-2
    assert np.max(np.abs(with_lora - forward(config, merged, tokens))) <= TOL
    folded = llama.merge_lora(params, lora_config)  # what export writes
    assert jax.tree.structure(folded) == jax.tree.structure(merged)
    for ours, reference in zip(jax.tree.leaves(folded), jax.tree.leaves(merged)):
        np.testing.assert_allclose(ours, reference, atol=1e-6)
    serving = llama.merge_lora(llama.unstack_layers(params), lora_config)["layers"]["1"]["attn"]["o"]["kernel"]
    np.testing.assert_allclose(serving, merged["layers"]["attn"]["o"]["kernel"][1], atol=1e-6)


def test_every_param_has_logical_axes():
    config = tiny_config(num_kv_heads=2, lora_rank=4)
    boxed = init_params(config)["params"]
    specs = nn.get_partition_spec(boxed)
    shapes = nn.unbox(boxed)
    flat_specs = jax.tree_util.tree_flatten_with_path(
        specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]
    flat_shapes = dict(jax.tree_util.tree_flatten_with_path(shapes)[0])
    assert len(flat_specs) == len(flat_shapes) == 3 + 2 + 4 * 3 + 3
    for path, spec in flat_specs:
        assert isinstance(spec, jax.sharding.PartitionSpec), path
        assert len(spec) == flat_shapes[path].ndim, (path, spec)
        assert all(isinstance(name, str) for name in spec), (path, spec)
        assert (spec[0] == "layers") == (path[0].key == "layers"), (path, spec)


def test_bf16_compute_close_to_fp32():
    config = tiny_config(num_kv_heads=2)
    hf = hf_llama(config, seed=5)
    params = convert_llama(state_dict_np(hf), config)
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, config.vocab_size, (2, 12)), jnp.int32)
    ref = np.asarray(forward(config, params, tokens))
    bf16 = forward(dataclasses.replace(config, dtype=jnp.bfloat16), params, tokens)
    assert bf16.dtype == jnp.float32
    err = np.max(np.abs(np.asarray(bf16) - ref))
    assert 0 < err <= 0.05 * np.max(np.abs(ref)), err


@pytest.mark.parametrize("policy", ["full", "minimal", "save_qkv_proj", "dots_no_batch"])
def test_remat_policies_match_no_remat_gradients(policy):
    config = tiny_config(num_kv_heads=2)
    params = nn.unbox(init_params(config))["params"]
    tokens = jnp.asarray(np.random.default_rng(6).integers(0, config.vocab_size, (2, 8)), jnp.int32)

    def loss(p, cfg):
        logits = forward(cfg, p, tokens)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], -1))

    grads = {policy: jax.grad(loss)(params, dataclasses.replace(config, remat_policy=policy))
             for policy in ("none", policy)}
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 grads["none"], grads[policy])
    assert float(jnp.max(jnp.abs(grads["none"]["layers"]["attn"]["q"]["kernel"]))) > 0


def test_named_remat_policies_keep_the_tagged_projections(capsys):
    """`minimal` keeps q/k/v, the attention output and the MLP output; `save_qkv_proj` only q/k/v:
    each saves more residuals for the backward pass than `full` and fewer than `none`."""
    config = tiny_config(num_kv_heads=2)
    params = nn.unbox(init_params(config))["params"]
    tokens = jnp.zeros((2, 8), jnp.int32)

    def residuals(policy):
        cfg = dataclasses.replace(config, remat_policy=policy)
        jax.ad_checkpoint.print_saved_residuals(lambda p: forward(cfg, p, tokens).sum(), params)
        return len(capsys.readouterr().out.splitlines())

    counts = {policy: residuals(policy) for policy in ("none", "full", "save_qkv_proj", "minimal")}
    assert counts["full"] < counts["save_qkv_proj"] < counts["minimal"] < counts["none"], counts


def test_serving_layout_gives_the_same_forward_and_decoding():
    """`unstack_layers` (one tree per layer) is read by the full forward and by decoding alike."""
    config = tiny_config(num_kv_heads=2)
    params = nn.unbox(init_params(config))["params"]
    serving = unstack_layers(jax.tree.map(jnp.copy, params))
    assert sorted(serving["layers"]) == [str(i) for i in range(config.num_layers)]
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, config.vocab_size, (2, 9)), jnp.int32)
    np.testing.assert_allclose(forward(config, serving, tokens), forward(config, params, tokens), atol=1e-6)

    def step(m, tokens, cache):
        hidden, cache = m.decode(m.embed(tokens), arange_positions(*tokens.shape), jnp.ones_like(tokens), cache)
        return m.logits(hidden)

    decode = jax.jit(functools.partial(LlamaDecoder(config).apply, method=step))
    cache = init_cache(config, batch_size=2)
    np.testing.assert_allclose(decode({"params": serving}, tokens, cache), decode({"params": params}, tokens, cache),
                               atol=1e-6)
