"""Text decoding with the `small` preset's LLM: emu2_jax `generate_text` against transformers
`LlamaForCausalLM.generate`, with the same weights and the same prompts, float32, on this machine, in
one invocation.

Both sides run the identical LLM computation: text-only prompts of random tokens (equal lengths, so
no padding), a stop id that the outputs are checked never to contain (every row decodes exactly
--new_tokens tokens), greedy and beam search (transformers 5's convention on our side). The
benchmark fails unless both sides produce the same tokens. Each side runs in its own child process,
--rounds times, alternating with the other side (so that a change in load on a shared machine hits
both); every figure is the fastest of --repeats warm calls over the rounds (our first call of a
shape compiles; its extra time is reported as compile time). Tokens/s = rows x new tokens / wall
time of the whole call (prefill included); time to first token = a call with max_new_tokens=1.
Prints a table, then `ratio=<ours/transformers>` of greedy tokens/s at --batch rows (> 1 means
emu2_jax is faster).

    python benchmarks/decode.py [--batch=8] [--prompt_len=128] [--new_tokens=64] [--beams=5] [--repeats=2]
        [--rounds=2] [--seed=0] [--hf_attention=sdpa]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.child import run_in_child  # noqa: E402


def _cases(args) -> list[tuple[str, int, int, int]]:
    """(name, rows, new tokens, beams) of each timed call."""
    return [("greedy_b1", 1, args.new_tokens, 1), (f"greedy_b{args.batch}", args.batch, args.new_tokens, 1),
            ("ttft_b1", 1, 1, 1), (f"ttft_b{args.batch}", args.batch, 1, 1),
            (f"beam{args.beams}_b1", 1, args.new_tokens, args.beams)]


def _prompts(args) -> np.ndarray:
    rng = np.random.default_rng(args.seed)
    return rng.integers(3, 32000, size=(args.batch, args.prompt_len)).astype(np.int32)


def _stop_id(config) -> int:
    return config.llm.vocab_size - 1  # the last added token: random weights almost never pick it


def _time(fn, repeats: int) -> tuple[float, float, np.ndarray]:
    """(first call's seconds, fastest of `repeats` later calls, the output)."""
    start = time.perf_counter()
    out = fn()
    first = time.perf_counter() - start
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return first, best, out


def _run_reference(weights_path: str, args, queue) -> None:
    import torch
    from safetensors.torch import load_file

    from emu2_jax.models import presets
    from tests.torch_refs import hf_llama  # before transformers: it lets transformers import without torchvision

    config = presets.get_config("small")
    hf = hf_llama(config.llm)
    hf.set_attn_implementation(args.hf_attention)
    hf.load_state_dict(load_file(weights_path))
    prompts = torch.from_numpy(_prompts(args)).long()
    result = {"threads": torch.get_num_threads()}
    for name, rows, new_tokens, beams in _cases(args):
        ids = prompts[:rows]

        def call(ids=ids, new_tokens=new_tokens, beams=beams):
            with torch.inference_mode():
                out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  do_sample=False, num_beams=beams, length_penalty=1.0, early_stopping=False,
                                  eos_token_id=_stop_id(config), pad_token_id=0)
            return out[:, ids.shape[1]:].numpy().astype(np.int32)

        _, seconds, tokens = _time(call, args.repeats)
        result[name] = {"seconds": seconds, "tokens": tokens.tolist()}
        print(f"  transformers {name}: {seconds:.3f} s", flush=True)
    queue.put(result)


def _run_ours(weights_path: str, args, queue) -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the comparison is on this machine's CPU
    import jax
    from flax import linen as nn
    from safetensors.numpy import load_file

    from emu2_jax.convert.llama import convert_llama
    from emu2_jax.inference import text
    from emu2_jax.models import emu2, llama, presets

    config = presets.get_config("small")
    model = emu2.Emu2Model(config)
    size = config.vision.image_size

    def no_images(rows):
        return {"images": np.zeros((rows, 0, size, 3 * size), np.uint8),
                "image_valid": np.zeros((rows, 0), bool), "image_is_frame": np.zeros((rows, 0), bool)}

    # The vision tower and projections are unused by text-only prompts: zeros of the right shapes.
    dummy = {"tokens": np.zeros((1, 4), np.int32), "positions": np.arange(4, dtype=np.int32)[None],
             "segment_ids": np.ones((1, 4), np.int32), **no_images(1)}
    shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), dummy))["params"])
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    params = jax.device_put({**params, "llm": convert_llama(load_file(weights_path), config.llm)})
    # The serving layout python -m emu2_jax.generate loads (checkpoints.load_llm): one array per layer.
    params["llm"] = llama.unstack_layers(params["llm"], donate=True)
    prompts = _prompts(args)
    result = {"threads": os.cpu_count()}
    for name, rows, new_tokens, beams in _cases(args):
        prompt = {**text.left_pad(prompts[:rows].tolist(), 0), **no_images(rows)}

        def call(prompt=prompt, new_tokens=new_tokens, beams=beams):
            return text.generate_text(model, params, prompt, max_new_tokens=new_tokens, num_beams=beams,
                                      stop_ids=(_stop_id(config),), beam_convention="transformers5").tokens

        first, seconds, tokens = _time(call, args.repeats)
        result[name] = {"seconds": seconds, "compile_seconds": max(first - seconds, 0.0), "tokens": tokens.tolist()}
        print(f"  emu2_jax {name}: {seconds:.3f} s (compile {first - seconds:.1f} s)", flush=True)
    queue.put(result)


def _fastest(best: dict | None, new: dict) -> dict:
    """Per case, the faster of two rounds' results (compile time: the first round's)."""
    if best is None:
        return new
    for name, case in new.items():
        if isinstance(case, dict) and case["seconds"] < best[name]["seconds"]:
            best[name] = {**case, "compile_seconds": best[name].get("compile_seconds", 0.0)}
    return best


def _check_same(results, args, stop_id: int) -> None:
    """Every row ran to --new_tokens without the stop id, and both sides chose the same tokens."""
    for name, _, new_tokens, _ in _cases(args):
        ours, ref = (np.asarray(results[side][name]["tokens"]) for side in ("emu2_jax", "transformers"))
        for side, tokens in (("emu2_jax", ours), ("transformers", ref)):
            if tokens.shape[1] != new_tokens or (tokens == stop_id).any() or (tokens < 0).any():
                raise SystemExit(f"{name}: {side} did not decode {new_tokens} tokens per row without stop id "
                                 f"{stop_id}; choose another --seed")
        if not np.array_equal(ours, ref):
            row, col = np.argwhere(ours != ref)[0]
            raise SystemExit(f"{name}: the sides differ first at row {row}, token {col}: emu2_jax "
                             f"{ours[row, :col + 1].tolist()} vs transformers {ref[row, :col + 1].tolist()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt_len", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--beams", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="warm calls per figure in each child")
    parser.add_argument("--rounds", type=int, default=2, help="child processes per side, run alternately")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hf_attention", default="sdpa", help="transformers attn_implementation (sdpa, eager)")
    args = parser.parse_args()

    from safetensors.torch import save_file

    from emu2_jax.models import presets
    from tests.torch_refs import hf_llama  # before transformers: it lets transformers import without torchvision

    config = presets.get_config("small")
    llm = config.llm
    print(f"small preset LLM ({llm.num_layers} layers x {llm.hidden_size}, vocab {llm.vocab_size}), float32, "
          f"prompts of {args.prompt_len} random tokens, {args.new_tokens} new tokens, fastest of {args.repeats} warm "
          f"calls x {args.rounds} rounds per figure, {os.cpu_count()} CPU cores", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "llm.safetensors")
        save_file({k: v.contiguous() for k, v in hf_llama(llm, seed=args.seed).state_dict().items()}, weights)
        results = {}
        for _ in range(args.rounds):  # alternate the sides: a load change on a shared machine hits both
            for name, target in (("transformers", _run_reference), ("emu2_jax", _run_ours)):
                results[name] = _fastest(results.get(name), run_in_child(target, weights, args))
    _check_same(results, args, _stop_id(config))
    print("greedy and beam-search tokens: identical on both sides", flush=True)

    ours, ref = results["emu2_jax"], results["transformers"]
    print(f"{'':<22}{'transformers':>14}{'emu2_jax':>12}{'speedup':>13}")
    summary = {}
    for name, rows, new_tokens, _ in _cases(args):
        if name.startswith("ttft"):
            label, theirs, mine = f"TTFT b{rows} (ms)", 1e3 * ref[name]["seconds"], 1e3 * ours[name]["seconds"]
            speedup = theirs / mine
        else:
            label = f"{name.replace('_', ' ')} (tok/s)"
            theirs, mine = (rows * new_tokens / r[name]["seconds"] for r in (ref, ours))
            speedup = mine / theirs
        summary[name] = {"transformers": round(theirs, 3), "emu2_jax": round(mine, 3), "speedup": round(speedup, 3),
                         "emu2_jax_compile_s": round(ours[name]["compile_seconds"], 2)}
        print(f"{label:<22}{theirs:>14.1f}{mine:>12.1f}{speedup:>12.2f}x")
    compile_s = {name: round(ours[name]["compile_seconds"], 1) for name, *_ in _cases(args)}
    print(f"emu2_jax compile time (first call minus a warm one), s: {compile_s}")
    print(f"torch threads {ref['threads']}")
    print(json.dumps(summary))
    greedy = f"greedy_b{args.batch}"
    print(f"ratio={ref[greedy]['seconds'] / ours[greedy]['seconds']:.3f}")


if __name__ == "__main__":
    main()
