"""The released Emu (v1) checkpoints (BAAI/Emu `Emu-pretrain.pt`, `Emu-instruct.pt`, the generation
pipeline's `multimodal_encoder/pytorch_model.bin`) -> `Emu2Model` params of an Emu v1 config.

Key layout (`Emu1/models/modeling_emu.py`; docs/model.md#emu-v1-checkpoints), `{L}` = `decoder.lm.`,
or `decoder.lm.base_model.model.` once PEFT's LoRA is attached (Emu-I):

    visual.*                                   EVA-CLIP tower, the Emu2 native EVA keys (eva_vit.py);
                                               visual.norm.*, visual.head.* unused (ignored)
    ln_visual.{weight,bias} [Dv]               connector/ln_visual/{scale,bias}
    cformer.causal_tokens [1, N, W]            connector/queries [N, W]
    cformer.cformer.block.{i}.layer.0.layer_norm.weight            connector/blocks/self_attn_norm/scale[i]
    cformer.cformer.block.{i}.layer.0.SelfAttention.{q,k,v}.weight connector/blocks/self_attn_{q,k,v}/kernel[i]
    cformer.cformer.block.{i}.layer.0.SelfAttention.o.weight       connector/blocks/self_attn_out/kernel[i]
    cformer.cformer.block.0.layer.0.SelfAttention.relative_attention_bias.weight [32, H]
                                               connector/rel_bias (shared by every block)
    cformer.cformer.block.{i}.layer.1.layer_norm.weight            connector/blocks/cross_attn_norm/scale[i]
    cformer.cformer.block.{i}.layer.1.EncDecAttention.{q,k,v,o}.weight   connector/blocks/cross_attn_*[i]
                                               (k, v: [W, Dv], read from the encoder width)
    cformer.cformer.block.{i}.layer.2.layer_norm.weight            connector/blocks/mlp_norm/scale[i]
    cformer.cformer.block.{i}.layer.2.DenseReluDense.{wi,wo}.weight connector/blocks/{fc1,fc2}/kernel[i]
    cformer.cformer.final_layer_norm.weight    connector/norm/scale
    cformer.cformer.embed_tokens.weight        T5's token table, never used (inputs are embeddings): ignored
    cformer.projection.{weight,bias} [D, W]    connector/project_up/{kernel,bias}
    {L}model.*, {L}lm_head.weight              llm (convert/llama.py)
    {L}...self_attn.{q,k,v,o}_proj.lora_A[.<adapter>].weight [r, in], lora_B [out, r]
                                               merged: W + (alpha / r) B A (PEFT's forward)
    {L}stu_regress_head.weight [D, D]          project_down/kernel

The model config comes from the tensors' shapes; what shapes do not fix is read from a `config.json`
beside the checkpoint when there is one (the release's `Emu-14B.json`: `vision_cfg.head_width`,
`postnorm`; LLaMA's `num_attention_heads`, `rms_norm_eps`, `rope_theta`, `max_position_embeddings`),
else the release's values (EVA head width 88, LLaMA head width 128, epsilon 1e-6). LoRA's alpha
comes from PEFT's `adapter_config.json` beside the checkpoint, else the release's 16.
"""
from __future__ import annotations

import math
import pathlib
import re
from collections.abc import Callable, Iterator, Mapping

import numpy as np
from flax import traverse_util

from emu2_jax.convert.eva_vit import _block, _Reader, eva_top, unexpected_eva_keys
from emu2_jax.convert.llama import _INV_FREQ, llama_entries
from emu2_jax.models import presets
from emu2_jax.models.causal_transformer import CausalTransformerConfig
from emu2_jax.models.emu2 import Emu2Config
from emu2_jax.models.eva_vit import VisionConfig
from emu2_jax.models.llama import LlamaConfig

LORA_ALPHA = 16.0   # the release's LoraConfig(r=16, lora_alpha=16) on q, k, v, o
EVA_HEAD_WIDTH = 88  # EVA-CLIP-g/14 (`Emu-14B.json`: width 1408, head_width 88)
T5 = "cformer.cformer."
_VISION_IGNORED = ("visual.norm.weight", "visual.norm.bias")  # the tower's unused pooled-output norm
_LORA = re.compile(r"(?P<stem>.+)\.lora_(?P<ab>[AB])(\.[^.]+)?\.weight")


def is_emu1(keys) -> bool:
    return any(k.startswith(("cformer.", "ln_visual.")) for k in keys)


def llm_prefix(keys) -> str:
    peft = "decoder.lm.base_model.model."
    return peft if any(k.startswith(peft) for k in keys) else "decoder.lm."


def lora_keys(keys) -> dict[str, dict[str, str]]:
    """{base weight stem: {"A": key, "B": key}} of the LoRA adapters (PEFT's `lora_A.weight`, or
    `lora_A.<adapter>.weight` from PEFT >= 0.3)."""
    found: dict[str, dict[str, str]] = {}
    for key in keys:
        match = _LORA.fullmatch(key)
        if match:
            slot = found.setdefault(match["stem"], {})
            if match["ab"] in slot:
                raise ValueError(f"two LoRA {match['ab']} matrices for {match['stem']}: {slot[match['ab']]}, {key}")
            slot[match["ab"]] = key
    for stem, pair in found.items():
        if len(pair) != 2:
            raise ValueError(f"LoRA {stem}: has lora_{next(iter(pair))} but not its other half")
    return found


def _count(keys, prefix: str) -> int:
    numbers = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    if numbers != set(range(len(numbers))):
        raise ValueError(f"{prefix}N: layer numbers {sorted(numbers)[:10]} are not 0..{len(numbers) - 1}")
    return len(numbers)


def config_from_shapes(shapes: Mapping[str, tuple[int, ...]], cfg: Mapping | None = None) -> Emu2Config:
    """The Emu v1 config of a checkpoint from its tensor shapes (`cfg`: the optional config.json)."""
    cfg = dict(cfg or {})
    vision_cfg = cfg.get("vision_cfg") or {}

    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise ValueError(f"Emu v1 checkpoint has no {key!r}")
        return shapes[key]

    width = shape("visual.cls_token")[-1]
    patch = shape("visual.patch_embed.proj.weight")[-1]
    grid = math.isqrt(shape("visual.pos_embed")[1] - 1)
    head_width = int(vision_cfg.get("head_width", EVA_HEAD_WIDTH))
    if width % head_width:
        raise ValueError(f"EVA width {width} is not a multiple of head width {head_width}: give the release's "
                         f"config.json (vision_cfg.head_width) or --model=<preset>")
    vision = VisionConfig(image_size=grid * patch, patch_size=patch, width=width,
                          depth=_count(shapes, "visual.blocks."), num_heads=width // head_width,
                          mlp_dim=shape("visual.blocks.0.mlp.fc1.weight")[0],
                          qkv_bias="visual.blocks.0.attn.q_bias" in shapes,
                          post_norm=bool(vision_cfg.get("postnorm", False)), layer_norm_eps=1e-6)
    _, queries, ct_width = shape("cformer.causal_tokens")
    buckets, ct_heads = shape(T5 + "block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    if shape(T5 + "block.0.layer.0.SelfAttention.q.weight")[0] != ct_width:
        raise ValueError("Causal Transformer attention width differs from its model width (T5 d_kv x heads != "
                         "d_model): not supported")
    if T5 + "block.0.layer.2.DenseReluDense.wi_0.weight" in shapes:
        raise ValueError("Causal Transformer with a gated MLP (wi_0 / wi_1): not supported; the release has wi / wo")
    connector = CausalTransformerConfig(
        num_queries=queries, width=ct_width, depth=_count(shapes, T5 + "block."), num_heads=ct_heads,
        mlp_dim=shape(T5 + "block.0.layer.2.DenseReluDense.wi.weight")[0], block="t5", input_norm=True,
        include_cls=True, output="llm", rel_buckets=buckets)
    lm = llm_prefix(shapes)
    vocab, hidden = shape(lm + "model.embed_tokens.weight")
    heads = int(cfg.get("num_attention_heads", hidden // 128))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    llm = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_layers=_count(shapes, lm + "model.layers."),
                      num_heads=heads, num_kv_heads=kv_heads,
                      intermediate_size=shape(lm + "model.layers.0.mlp.gate_proj.weight")[0],
                      rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=float(cfg.get("rope_theta", 1e4)),
                      max_cache_length=int(cfg.get("max_position_embeddings", 2048)))
    added = presets.EMU1_INSTRUCT_ADDED if lora_keys(shapes) else presets.EMU1_ADDED
    image = vocab - added + 3  # [PAD], [IMG], [/IMG], <image>: the release's order
    n = int((cfg.get("vladapter_cfg") or {}).get("n_causal", queries))
    if n != queries:
        raise ValueError(f"config.json: vladapter_cfg.n_causal={n}, but cformer.causal_tokens holds {queries}")
    return Emu2Config(vision=vision, llm=llm, connector="causal_transformer", causal_transformer=connector,
                      n_query=queries, v_query=queries, image_token_id=image, frame_token_id=image + 1)


def lora_alpha(folder: pathlib.Path, read_json: Callable[[pathlib.Path], dict | None]) -> float:
    return float((read_json(folder / "adapter_config.json") or {}).get("lora_alpha", LORA_ALPHA))


Write = tuple[tuple[str, ...], np.ndarray, "int | None", int]


def emu1_writes(src, config: Emu2Config, alpha: float = LORA_ALPHA) -> Iterator[Write]:
    """The Emu2Model leaves of an Emu v1 checkpoint, one tensor (an EVA block) at a time. `src`: a
    `source.Source` (keys, shapes, `src[key]`, the `ignored` set)."""
    ct, vc, lc = config.causal_transformer, config.vision, config.llm
    if config.connector != "causal_transformer" or ct.block != "t5" or not (ct.input_norm and ct.include_cls):
        raise ValueError("an Emu v1 checkpoint needs an Emu v1 release config (a t5-block Causal Transformer with "
                         "ln_visual reading CLS too, e.g. --model=emu1_release)")
    if ct.output != "llm":
        raise ValueError("an Emu v1 checkpoint regresses LLM-width embeddings: causal_transformer.output='llm'")

    def fetch(key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in src:
            raise ValueError(f"checkpoint has no {key!r}")
        if src.shapes[key] != tuple(shape):
            raise ValueError(f"{key}: shape {src.shapes[key]}, expected {tuple(shape)} for this config")
        return src[key]

    read = _Reader(src, "visual.")
    for path, value in _flat(eva_top(read, vc)):
        yield ("visual", *path), value, None, 0
    for i in range(vc.depth):
        for path, value in _flat(_block(read, i, vc)):
            yield ("visual", "blocks", *path), value, i, vc.depth
    unexpected = [k for k in unexpected_eva_keys(src.keys(), "visual.", read.used) if k not in _VISION_IGNORED]
    if unexpected:
        raise ValueError(f"unexpected vision tower keys: {unexpected[:10]}")
    src.ignored.update(k for k in src if k.startswith("visual.") and k not in read.used)

    vw, w, h, d = vc.width, ct.width, ct.num_heads, ct.width // ct.num_heads
    top = [(("ln_visual", "scale"), fetch("ln_visual.weight", (vw,))),
           (("ln_visual", "bias"), fetch("ln_visual.bias", (vw,))),
           (("queries",), fetch("cformer.causal_tokens", (1, ct.num_queries, w))[0]),
           (("rel_bias",), fetch(T5 + "block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                                 (ct.rel_buckets, h))),
           (("norm", "scale"), fetch(T5 + "final_layer_norm.weight", (w,))),
           (("project_up", "kernel"), fetch("cformer.projection.weight", (lc.hidden_size, w)).T),
           (("project_up", "bias"), fetch("cformer.projection.bias", (lc.hidden_size,)))]
    for path, value in top:
        yield ("connector", *path), value, None, 0
    src.ignored.update(k for k in src if k == T5 + "embed_tokens.weight")
    for i in range(ct.depth):
        for path, value in _t5_block(fetch, f"{T5}block.{i}.", w, vw, h, d, ct.mlp_dim):
            yield ("connector", "blocks", *path), value, i, ct.depth

    yield from _llama_writes(src, fetch, lc, llm_prefix(src.keys()), alpha)


def _flat(tree: dict) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    yield from traverse_util.flatten_dict(tree).items()


def _t5_block(fetch, p: str, w: int, vw: int, h: int, d: int, f: int) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """One T5 decoder block: Linear [out, in] -> Dense kernels with (heads, head_dim) split out."""
    for layer, attn, name, kv_width in ((0, "SelfAttention", "self_attn", w), (1, "EncDecAttention", "cross_attn", vw)):
        a = f"{p}layer.{layer}.{attn}."
        yield (f"{name}_norm", "scale"), fetch(f"{p}layer.{layer}.layer_norm.weight", (w,))
        yield (f"{name}_q", "kernel"), fetch(a + "q.weight", (w, w)).T.reshape(w, h, d)
        yield (f"{name}_k", "kernel"), fetch(a + "k.weight", (w, kv_width)).T.reshape(kv_width, h, d)
        yield (f"{name}_v", "kernel"), fetch(a + "v.weight", (w, kv_width)).T.reshape(kv_width, h, d)
        yield (f"{name}_out", "kernel"), fetch(a + "o.weight", (w, w)).T.reshape(h, d, w)
    yield ("mlp_norm", "scale"), fetch(f"{p}layer.2.layer_norm.weight", (w,))
    yield ("fc1", "kernel"), fetch(f"{p}layer.2.DenseReluDense.wi.weight", (f, w)).T
    yield ("fc2", "kernel"), fetch(f"{p}layer.2.DenseReluDense.wo.weight", (w, f)).T


def _llama_writes(src, fetch, lc: LlamaConfig, lm: str, alpha: float) -> Iterator[Write]:
    """LLaMA leaves with any LoRA folded into its weight, then the regression head."""
    lora = lora_keys(src.keys())
    src.ignored.update(k for k in src if k.startswith(lm) and k.endswith(_INV_FREQ))

    def weight(key: str, shape: tuple[int, ...]) -> np.ndarray:
        stem = key[:-len(".weight")]
        base = f"{stem}.base_layer.weight"  # PEFT >= 0.7 moves the wrapped weight there
        value = fetch(base if base in src else key, shape)
        if stem not in lora:
            return value
        a, b = src[lora[stem]["A"]].astype(np.float32), src[lora[stem]["B"]].astype(np.float32)
        rank = a.shape[0]
        if a.shape != (rank, shape[1]) or b.shape != (shape[0], rank):
            raise ValueError(f"LoRA {stem}: lora_A {a.shape}, lora_B {b.shape} do not fit the weight {shape}")
        return value.astype(np.float32) + (alpha / rank) * (b @ a)  # float32; written in --dtype

    layer_entries, top_entries = llama_entries(lc)
    for suffix, shape, path, fn in top_entries:
        yield ("llm", *path), fn(weight(lm + suffix, shape)), None, 0
    for i in range(lc.num_layers):
        for suffix, shape, path, fn in layer_entries:
            yield ("llm", "layers", *path), fn(weight(f"{lm}model.layers.{i}.{suffix}", shape)), i, lc.num_layers
    unmerged = sorted(stem for stem in lora if not all(k in src.used for k in lora[stem].values()))
    if unmerged:
        raise ValueError(f"LoRA adapters on weights the LLaMA does not have: {unmerged[:10]}")
    d = lc.hidden_size
    yield ("project_down", "kernel"), fetch(lm + "stu_regress_head.weight", (d, d)).T, None, 0
