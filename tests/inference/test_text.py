"""Text generation: greedy equals the argmax of full forwards; beam search equals transformers';
sampling is reproducible and its filters keep the intended mass."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn

from emu2_jax.convert.llama import convert_llama
from emu2_jax.inference import text
from emu2_jax.models import emu2, presets
from emu2_jax.models.llama import LlamaConfig
from tests.torch_refs import hf_llama, state_dict_np

NEW_TOKENS = 12
# Stop ids that end some beams early and leave others to run to max_new_tokens with these weights.
STOP_IDS = (553, 479, 592)


def no_images(rows: int, size: int) -> dict[str, np.ndarray]:
    return {"images": np.zeros((rows, 0, size, 3 * size), np.uint8), "image_valid": np.zeros((rows, 0), bool),
            "image_is_frame": np.zeros((rows, 0), bool)}


@pytest.fixture(scope="module")
def text_model():
    """Emu2Model whose LLM holds the weights of a random transformers LLaMA."""
    llm = LlamaConfig(vocab_size=1300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4,
                      intermediate_size=112, rms_norm_eps=1e-5, max_cache_length=256)
    config = dataclasses.replace(presets.tiny(), llm=llm)
    model = emu2.Emu2Model(config)
    hf = hf_llama(llm, seed=3)
    size = config.vision.image_size
    dummy = {"tokens": np.zeros((1, 4), np.int32), "positions": np.arange(4, dtype=np.int32)[None],
             "segment_ids": np.ones((1, 4), np.int32), **no_images(1, size)}
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), dummy))["params"]
    params = {**params, "llm": convert_llama(state_dict_np(hf), llm)}
    rng = np.random.default_rng(0)
    prompts = [rng.integers(10, 1000, n).tolist() for n in (5, 9, 3)]
    prompt = {**text.left_pad(prompts, 0), **no_images(len(prompts), size)}
    return model, params, hf, prompts, prompt


def hf_beam(hf, prompt_row, *, num_beams, length_penalty, stop_id):
    out = hf.generate(torch.tensor([prompt_row]), max_new_tokens=NEW_TOKENS, num_beams=num_beams,
                      length_penalty=length_penalty, do_sample=False, early_stopping=False, eos_token_id=stop_id,
                      pad_token_id=0)
    return text.truncate_at(out[0, len(prompt_row):].tolist(), stop_id)


def release_score(hf, prompt_row, tokens, stop_id, length_penalty):
    """transformers 4.31's score of a hypothesis generated from input embeddings: log-prob sum
    (with the stop token's when it ended there) / (1 + tokens before the stop) ** length_penalty."""
    stopped = len(tokens) < NEW_TOKENS
    ids = prompt_row + tokens + ([stop_id] if stopped else [])
    with torch.no_grad():
        log_probs = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1).numpy()
    picked = [log_probs[len(prompt_row) - 1 + i, t] for i, t in enumerate(ids[len(prompt_row):])]
    return sum(picked) / (1 + len(tokens)) ** length_penalty


@pytest.mark.parametrize("length_penalty", [-1.0, 0.0, 1.0, 2.0])
def test_beam_search_parity_with_transformers(text_model, length_penalty):
    """convention='transformers5' is transformers 5's beam search token for token; the release
    convention (4.31 from input embeddings) picks the same hypotheses where no beam reaches
    max_new_tokens first, and otherwise a hypothesis 4.31 scores at least as high."""
    model, params, hf, prompts, prompt = text_model
    differ, stopped = 0, 0
    for stop_id in STOP_IDS:
        ours = {c: text.generate_text(model, params, prompt, max_new_tokens=NEW_TOKENS, num_beams=4,
                                      length_penalty=length_penalty, stop_ids=(stop_id,), beam_convention=c).rows()
                for c in ("transformers5", "release")}
        for i, row in enumerate(prompts):
            reference = hf_beam(hf, row, num_beams=4, length_penalty=length_penalty, stop_id=stop_id)
            assert ours["transformers5"][i] == reference, (stop_id, i)
            stopped += len(reference) < NEW_TOKENS
            release = ours["release"][i]
            if release != reference:
                differ += 1
                assert max(len(release), len(reference)) == NEW_TOKENS  # only a beam cut by the length differs
                assert (release_score(hf, row, release, stop_id, length_penalty)
                        >= release_score(hf, row, reference, stop_id, length_penalty) - 1e-6)
    assert stopped  # with these weights some hypotheses end at a stop id, not only at the length
    if length_penalty <= 0:  # shorter beams never gain from the length: the conventions agree
        assert differ == 0


def reference_greedy(forward, prompt_row, steps):
    tokens = list(prompt_row)
    for _ in range(steps):
        logits = forward(jnp.asarray([tokens], jnp.int32))
        tokens.append(int(jnp.argmax(logits[0, -1])))
    return tokens[len(prompt_row):]


def test_greedy_equals_argmax_of_full_forward_and_transformers(text_model):
    model, params, hf, prompts, prompt = text_model
    out = text.generate_text(model, params, prompt, max_new_tokens=NEW_TOKENS, stop_ids=(1299,))
    assert out.tokens.shape == (3, NEW_TOKENS) and out.lengths.tolist() == [NEW_TOKENS] * 3
    forward = jax.jit(lambda t: model.apply({"params": params}, t, jnp.arange(t.shape[1])[None],
                                            method=lambda m, t, p: m.llm.forward(t, p)))
    for i, row in enumerate(prompts):
        assert out.rows()[i] == reference_greedy(forward, row, NEW_TOKENS)
        with torch.no_grad():
            hf_out = hf.generate(torch.tensor([row]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=1299,
                                 pad_token_id=0)
        assert out.rows()[i] == hf_out[0, len(row):].tolist()


def test_rows_stop_independently(text_model):
    model, params, _, _, prompt = text_model
    free = text.generate_text(model, params, prompt, max_new_tokens=NEW_TOKENS, stop_ids=(1299,)).rows()
    stop = free[1][4]  # row 1's fifth token ends row 1 there (and any row that produces it)
    out = text.generate_text(model, params, prompt, max_new_tokens=NEW_TOKENS, stop_ids=(stop,))
    for i, row in enumerate(free):
        expected = text.truncate_at(row, stop)
        assert out.rows()[i] == expected
        assert out.tokens[i, len(expected):].tolist() == [-1] * (NEW_TOKENS - len(expected))
    assert out.lengths[1] <= 4


def test_sampling_is_reproducible_and_seeded(text_model):
    model, params, _, _, prompt = text_model
    sample = lambda seed, **kw: text.generate_text(model, params, prompt, max_new_tokens=NEW_TOKENS, do_sample=True,
                                                   rng=jax.random.key(seed), stop_ids=(1299,), **kw).rows()
    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    greedy = text.generate_text(model, params, prompt, max_new_tokens=NEW_TOKENS, stop_ids=(1299,)).rows()
    assert sample(3, top_k=1) == greedy  # top-k 1 leaves only the argmax
    assert sample(4, temperature=1e-4) == greedy


def test_filters_keep_the_intended_mass():
    probs = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    logits = jnp.log(jnp.asarray(probs))[None]
    kept = lambda **kw: np.isfinite(np.asarray(text.filter_logits(
        logits, jnp.float32(kw.get("t", 1.0)), jnp.int32(kw.get("k", 0)), jnp.float32(kw.get("p", 1.0)))))[0]
    assert kept().all()
    assert kept(k=3).tolist() == [True, True, True, False, False, False]
    # top-p keeps the smallest most-likely set whose mass reaches p
    assert kept(p=0.4).tolist() == [True] + [False] * 5
    assert kept(p=0.5).tolist() == [True, True] + [False] * 4
    assert kept(p=0.65).tolist() == [True, True] + [False] * 4
    assert kept(p=0.66).tolist() == [True, True, True] + [False] * 3
    assert kept(p=0.01).tolist() == [True] + [False] * 5
    assert kept(k=2, p=0.9).tolist() == [True, True] + [False] * 4
    # the kept distribution is the original renormalised over the kept set
    filtered = np.asarray(jax.nn.softmax(text.filter_logits(logits, jnp.float32(1.0), jnp.int32(0),
                                                            jnp.float32(0.75))))[0]
    np.testing.assert_allclose(filtered[:3], probs[:3] / probs[:3].sum(), rtol=1e-5)
    # sampling frequencies follow the kept mass
    draws = jax.random.categorical(jax.random.key(0), text.filter_logits(
        jnp.tile(logits, (20000, 1)), jnp.float32(1.0), jnp.int32(0), jnp.float32(0.75)))
    freq = np.bincount(np.asarray(draws), minlength=6) / 20000
    np.testing.assert_allclose(freq, np.append(probs[:3] / probs[:3].sum(), [0, 0, 0]), atol=0.015)


def test_bad_arguments_fail_before_work(text_model):
    model, params, _, _, prompt = text_model
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        text.generate_text(model, params, prompt, max_new_tokens=0)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        text.generate_text(model, params, prompt, max_new_tokens=250)
    with pytest.raises(ValueError, match="top_p=1.5"):
        text.generate_text(model, params, prompt, max_new_tokens=2, do_sample=True, top_p=1.5)
    with pytest.raises(ValueError, match="convention='hf'"):
        text.generate_text(model, params, prompt, max_new_tokens=2, num_beams=2, beam_convention="hf")
