"""Which published layout a checkpoint is in, and its model config (from `config.json` files).

Layouts (docs/model.md#checkpoint-layouts):
  native        Emu2 / Emu2-Chat `EmuModel` keys: `visual.`, `decoder.lm.`, `project_up/down`
  hf            BAAI/Emu2, Emu2-Chat (`EmuForCausalLM`): `model.visual.`, `model.decoder.lm.`
  gen_native    Emu2-Gen single file: `multimodal_encoder.` (native keys), `unet.`, `vae.`,
                `safety_checker.` (ignored)
  gen_diffusers Emu2-Gen folder: `multimodal_encoder/` (hf layout), `unet/`, `vae/`, `tokenizer/`, ...
  diffusers     a folder with `unet/` and / or `vae/` only, or one diffusers UNet / VAE folder
  emu1          the released Emu (v1): `visual.`, `ln_visual.`, `cformer.`, `decoder.lm.` (PEFT-wrapped
                with LoRA in Emu-I); config from its shapes (`emu2_jax.convert.emu1`)

Each layout becomes a list of `Part`s: one model component group read from one set of files under a
key prefix, with its config.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax.numpy as jnp

from emu2_jax.convert import emu1
from emu2_jax.convert.source import Source, _safetensors_header, source_files
from emu2_jax.models import presets
from emu2_jax.models.emu2 import Emu2Config
from emu2_jax.models.eva_vit import VisionConfig
from emu2_jax.models.llama import LlamaConfig

# Added tokens after the base vocabulary (presets: [PAD], [IMG], [/IMG], <image>, [gIMG], ...).
_NUM_ADDED, _NUM_CHAT, _IMAGE_OFFSET, _FRAME_OFFSET = 272, 2, 3, 4
_DIFFUSERS_CLASSES = {"UNet2DConditionModel": "unet", "AutoencoderKL": "vae"}


@dataclasses.dataclass
class Part:
    kind: str                   # "emu2", "unet" or "vae"
    files: list[pathlib.Path]
    prefix: str                 # before the layout's own keys ("multimodal_encoder." in Emu2-Gen's file)
    config: Any                 # Emu2Config, or the diffusers config dict of a UNet / VAE
    ignore: tuple[str, ...] = ()  # key prefixes present on purpose and not converted


def _json(path: pathlib.Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def emu2_config_from_hf(cfg: dict, where: str) -> Emu2Config:
    """`Emu2Config` from an HF `EmuConfig` dict: LLaMA fields, `vision_config`, `model_version`."""
    try:
        vision = cfg["vision_config"]
        chat = cfg.get("model_version", "base") == "chat"
        width = int(vision["width"])
        base_vocab = int(cfg["vocab_size"]) - _NUM_ADDED - (_NUM_CHAT if chat else 0)
        return Emu2Config(
            vision=VisionConfig(
                image_size=int(vision["image_size"]), patch_size=int(vision["patch_size"]), width=width,
                depth=int(vision["layers"]), num_heads=width // int(vision["head_width"]),
                mlp_dim=round(width * float(vision["mlp_ratio"])), qkv_bias=bool(vision.get("qkv_bias", True)),
                post_norm=bool(vision.get("postnorm", True)),
                layer_norm_eps=float(vision.get("layer_norm_eps") or 1e-6)),
            llm=LlamaConfig(
                vocab_size=int(cfg["vocab_size"]), hidden_size=int(cfg["hidden_size"]),
                num_layers=int(cfg["num_hidden_layers"]), num_heads=int(cfg["num_attention_heads"]),
                num_kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
                intermediate_size=int(cfg["intermediate_size"]), rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(cfg.get("rope_theta", 10000.0)),
                max_cache_length=int(cfg.get("max_position_embeddings", 2048))),
            n_query=int(vision.get("n_query", 256 if chat else 64)), v_query=int(vision.get("v_query", 64)),
            image_token_id=base_vocab + _IMAGE_OFFSET, frame_token_id=base_vocab + _FRAME_OFFSET)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: not an Emu2 config.json ({type(e).__name__}: {e})") from None


def emu2_config_to_hf(config: Emu2Config) -> dict:
    """The HF `EmuConfig` fields `emu2_config_from_hf` reads back into `config` (export's config.json)."""
    vc, lc = config.vision, config.llm
    chat = lc.vocab_size - _NUM_ADDED - _NUM_CHAT + _IMAGE_OFFSET == config.image_token_id
    return {"architectures": ["EmuForCausalLM"], "model_type": "emu", "model_version": "chat" if chat else "base",
            "vocab_size": lc.vocab_size, "hidden_size": lc.hidden_size, "intermediate_size": lc.intermediate_size,
            "num_hidden_layers": lc.num_layers, "num_attention_heads": lc.num_heads,
            "num_key_value_heads": lc.num_kv_heads, "rms_norm_eps": lc.rms_norm_eps, "rope_theta": lc.rope_theta,
            "max_position_embeddings": lc.max_cache_length,
            "vision_config": {"image_size": vc.image_size, "patch_size": vc.patch_size, "width": vc.width,
                              "layers": vc.depth, "head_width": vc.head_dim, "mlp_ratio": vc.mlp_dim / vc.width,
                              "qkv_bias": vc.qkv_bias, "postnorm": vc.post_norm, "layer_norm_eps": vc.layer_norm_eps,
                              "n_query": config.n_query, "v_query": config.v_query}}


def _emu2_config(folder: pathlib.Path, model: str) -> Emu2Config:
    if model != "auto":
        return presets.get_config(model)
    cfg = _json(folder / "config.json")
    if cfg is None:
        raise ValueError(f"{folder}: no config.json to size the model from; pass --model=<preset> "
                         f"(one of {sorted(presets.PRESETS)})")
    return emu2_config_from_hf(cfg, str(folder / "config.json"))


def _emu1_config(folder: pathlib.Path, files: list[pathlib.Path], model: str) -> Emu2Config:
    """`--model=<preset>`, else from the checkpoint's shapes and an optional release config.json."""
    if model != "auto":
        return presets.get_config(model)
    return emu1.config_from_shapes(Source(files).shapes, _json(folder / "config.json"))


def _diffusers_config(folder: pathlib.Path, kind: str) -> dict:
    cfg = _json(folder / "config.json")
    if cfg is None:
        raise ValueError(f"{folder}: a diffusers {kind} folder needs its config.json")
    return cfg


def _keys_of(files: list[pathlib.Path]) -> list[str]:
    """The keys of safetensors files from their headers, or of an index; `.bin` keys are read later."""
    keys: list[str] = []
    for file in files:
        if file.name.endswith(".safetensors"):
            try:
                keys.extend(_safetensors_header(file))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{file}: cannot read it ({e})") from e
        else:
            keys.extend(Source([file]).keys())
    return keys


def detect(src: str, model: str = "auto") -> tuple[str, list[Part]]:
    """(layout name, parts) of the checkpoint at `src`; ValueError / FileNotFoundError name the problem."""
    path = pathlib.Path(src)
    if not path.exists():
        raise FileNotFoundError(f"--src={src}: no such file or directory")
    folder = path if path.is_dir() else path.parent
    if path.is_dir() and (path / "multimodal_encoder").is_dir():
        enc = path / "multimodal_encoder"
        if emu1.is_emu1(_keys_of(source_files(enc))):
            raise ValueError(f"--src={src}: Emu v1's generation pipeline folder; convert its encoder alone "
                             f"(--src={enc}, layout emu1): its SD-1.5-style UNet and VAE do not convert with it")
        parts = [Part("emu2", source_files(enc), "", _emu2_config(enc, model))]
        parts += [Part(kind, source_files(path / kind), "", _diffusers_config(path / kind, kind))
                  for kind in ("unet", "vae")]
        return "gen_diffusers", parts
    if path.is_dir() and ((path / "unet").is_dir() or (path / "vae").is_dir()):
        return "diffusers", [Part(kind, source_files(path / kind), "", _diffusers_config(path / kind, kind))
                             for kind in ("unet", "vae") if (path / kind).is_dir()]
    own = _json(folder / "config.json") or {}
    if own.get("_class_name") in _DIFFUSERS_CLASSES:
        kind = _DIFFUSERS_CLASSES[own["_class_name"]]
        return "diffusers", [Part(kind, source_files(path), "", own)]

    files = source_files(path)
    keys = _keys_of(files)
    if emu1.is_emu1(keys):
        return "emu1", [Part("emu2", files, "", _emu1_config(folder, files, model))]
    if any(k.startswith("multimodal_encoder.") for k in keys):
        parts = [Part("emu2", files, "multimodal_encoder.", _emu2_config(folder, model), ("safety_checker.",))]
        for kind in ("unet", "vae"):  # configs as in the official repo's diffusion_config/{unet,vae}/
            parts.append(Part(kind, files, f"{kind}.", _diffusers_config(folder / kind, kind)))
        return "gen_native", parts
    if any(k.startswith("model.visual.") for k in keys):
        return "hf", [Part("emu2", files, "", _emu2_config(folder, model))]
    if any(k.startswith("visual.") for k in keys) and any(k.startswith("decoder.lm.") for k in keys):
        return "native", [Part("emu2", files, "", _emu2_config(folder, model))]
    raise ValueError(f"--src={src}: unknown layout (first keys {sorted(keys)[:5]}); expected Emu2 (visual., "
                     f"decoder.lm.), HF Emu2 (model.visual.), Emu2-Gen (multimodal_encoder.) or diffusers folders")


def emu2_config_to_json(config: Emu2Config) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config), default=lambda x: jnp.dtype(x).name))


def emu2_config_from_json(data: dict) -> Emu2Config:
    from emu2_jax.models.causal_transformer import CausalTransformerConfig

    def build(cls, fields: dict):
        return cls(**{k: (jnp.dtype(v) if k in ("dtype", "param_dtype") else v) for k, v in fields.items()})

    data = dict(data)
    data["vision"] = build(VisionConfig, data["vision"])
    data["llm"] = build(LlamaConfig, data["llm"])
    if data.get("causal_transformer") is not None:
        data["causal_transformer"] = build(CausalTransformerConfig, data["causal_transformer"])
    return Emu2Config(**data)
