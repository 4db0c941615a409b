"""Loading what inference runs on: any checkpoint the project writes.

- a training workdir of an LLM stage (stage1, stage2, chat, gen, emu1_chat), its `checkpoints/`
  folder (the latest step) or one step folder: the run config saved with it gives the model and
  the tokenizer;
- an `init_from` directory: a checkpoint converted by `python -m emu2_jax.convert` (its
  `emu2_jax_model.json` gives the model) or saved with `checkpointing.save_params`;
- for the visual decoder, a `decoder`-stage workdir or a converted Emu2-Gen (encoder, UNet, VAE);
  for the video decoder, a `video_decoder`-stage workdir.

Errors are one line naming the `--checkpoint` (or `--tokenizer`) and what is wrong, raised before
any weights are read.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import ml_collections
from etils import epath
from flax import linen as nn

from emu2_jax import checkpointing
from emu2_jax import sharding as sh
from emu2_jax.convert.stream import CONFIG_FILE
from emu2_jax.data import layout
from emu2_jax.data import tokenizer as tokenizer_lib
from emu2_jax.models import emu2, llama, video_decoder, visual_decoder

PyTree = Any


@dataclasses.dataclass(frozen=True)
class LoadedLlm:
    model: emu2.Emu2Model
    params: PyTree
    tokenizer: tokenizer_lib.Tokenizer
    run_config: ml_collections.ConfigDict | None   # the training run's config (None when converted)
    path: str


@dataclasses.dataclass(frozen=True)
class LoadedDecoder:
    model: visual_decoder.VisualDecoderModel
    params: PyTree
    path: str


@dataclasses.dataclass(frozen=True)
class LoadedVideoDecoder:
    model: video_decoder.VideoDecoderModel
    params: PyTree
    run_config: ml_collections.ConfigDict   # sample_fps and the clip length come from it
    path: str


def _existing(path: str, flag: str = "--checkpoint") -> epath.Path:
    root = epath.Path(path).expanduser().absolute()
    if not root.exists():
        raise SystemExit(f"{flag}={path}: no such file or directory")
    return root


def run_config(path: str) -> ml_collections.ConfigDict | None:
    """The run config saved with the checkpoint `path` loads from, or None for a params-only one."""
    directory, prefix = checkpointing._params_source(_existing(path))
    run_file = directory.parent / "config" / "config.json"
    if not prefix or not run_file.is_file():
        return None
    return ml_collections.ConfigDict(json.loads(run_file.read_text()))


def _tokenizer(path: epath.Path, tokenizer: str | None, config: ml_collections.ConfigDict | None,
               vocab_size: int) -> tokenizer_lib.Tokenizer:
    """`--tokenizer`, else a tokenizer.model next to the checkpoint, else the run's
    data.tokenizer_path, else the embedded one; the one matching the model's vocabulary."""
    if tokenizer:
        choice, flag = str(_existing(tokenizer, "--tokenizer")), "--tokenizer"
    elif (path / "tokenizer.model").is_file():
        choice, flag = str(path / "tokenizer.model"), "--checkpoint"
    else:
        choice, flag = (config.data.get("tokenizer_path") if config else "") or None, "--tokenizer"
    try:
        return tokenizer_lib.tokenizer_for_vocab(choice, vocab_size)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"{flag}: {e}") from None


def abstract_params(model: emu2.Emu2Model, mesh: jax.sharding.Mesh, rules: sh.Rules = sh.LOGICAL_RULES) -> PyTree:
    """The model's params as ShapeDtypeStructs carrying the NamedShardings their logical axes give on
    `mesh` under `rules` (the training rules: FSDP / tensor parallel as configured)."""
    cfg = model.config
    dummy = layout.abstract(layout.PROMPT, rows=1, seq_len=8, slots=1, image_size=cfg.vision.image_size)
    boxed = jax.eval_shape(lambda b: model.init(jax.random.key(0), b, method=_touch_all), dummy)["params"]
    shardings = sh.param_shardings(boxed, mesh, rules)
    return jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                        nn.unbox(boxed), shardings)


def _touch_all(model: emu2.Emu2Model, prompt) -> Any:
    """Every parameter of Emu2Model from a prompt batch (no targets needed)."""
    embeds, _ = model.embed_inputs(prompt["tokens"], prompt["images"], prompt["image_valid"], prompt["image_is_frame"])
    hidden = model.llm(embeds, prompt["positions"], prompt["segment_ids"])
    return model.llm.logits(hidden), model.project_down(hidden)


def load_llm(path: str, *, tokenizer: str | None = None, mesh: jax.sharding.Mesh | None = None,
             rules: sh.Rules = sh.LOGICAL_RULES) -> LoadedLlm:
    """Emu2Model, its params (LLM layers in the serving layout, `llama.unstack_layers`) and tokenizer
    from a training run of an LLM stage or a converted Emu2 / Emu2-Chat / Emu2-Gen checkpoint. With
    `mesh`, each parameter is restored straight into the shards its logical axes give under `rules`
    (as in training), never whole on one host."""
    root = _existing(path)
    config = run_config(path)
    if config is not None and config.get("task", "llm") != "llm":
        raise SystemExit(f"--checkpoint={path}: a {config.get('stage')!r} checkpoint has no language model; "
                         f"give an LLM stage (stage1, stage2, chat, gen, emu1_chat) or a converted Emu2")
    try:
        model_config = checkpointing.pretrained_config(str(root))
        if "emu2" not in model_config:
            raise SystemExit(f"--checkpoint={path}: holds {sorted(model_config)}, no Emu2 language model")
        model = emu2.Emu2Model(model_config["emu2"])
        tok = _tokenizer(root, tokenizer, config, model.config.llm.vocab_size)
        mesh = mesh or sh.create_mesh((1, 1, 1), jax.devices()[:1])
        params = checkpointing.load_params(str(root), abstract_params(model, mesh, rules), emu2.COMPONENTS)
        params["llm"] = llama.unstack_layers(params["llm"], donate=True)  # the serving layout
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"--checkpoint={path}: {e}") from None
    return LoadedLlm(model=model, params=params, tokenizer=tok, run_config=config, path=str(root))


def load_converted_decoder(root: epath.Path) -> LoadedDecoder | None:
    """The visual decoder of a converted Emu2-Gen checkpoint, or None when `root` is not a converted
    checkpoint. The decoder's resolution is the UNet's `sample_size` latents times the VAE's downsampling."""
    if not (root / CONFIG_FILE).is_file():
        return None
    model_config, params = checkpointing.load_pretrained(str(root))
    missing = [part for part in ("emu2", "unet", "vae") if part not in model_config]
    if missing:
        raise SystemExit(f"--checkpoint={root}: a converted checkpoint without {missing}; the visual decoder "
                         f"needs Emu2-Gen (encoder, UNet and VAE)")
    saved = json.loads((root / CONFIG_FILE).read_text())
    emu2_cfg, vae_cfg = model_config["emu2"], model_config["vae"]
    config = visual_decoder.DecoderModelConfig(
        vision=emu2_cfg.vision, unet=model_config["unet"], vae=vae_cfg, n_query=emu2_cfg.n_query,
        decoder_image_size=int(saved["unet"].get("sample_size", 128)) * vae_cfg.downsample_factor)
    return LoadedDecoder(visual_decoder.VisualDecoderModel(config), {k: params[k] for k in ("visual", "unet", "vae")},
                         str(root))


def _stage_run(path: str, stage: str, flag: str) -> epath.Path:
    """The checkpoint root of a `stage` training run; SystemExit naming `flag` otherwise."""
    root = _existing(path, flag)
    config = run_config(path)
    if config is None or config.get("stage") != stage:
        found = config.get("stage") if config else None
        what = "the visual decoder's (configs/decoder.py) or a converted Emu2-Gen" if stage == "decoder" else \
            f"the {stage.replace('_', ' ')}'s (configs/{stage}.py)"
        raise SystemExit(f"{flag}={path}: " + (f"a {found!r} checkpoint, not {what}" if found else
                                                f"no training checkpoint (checkpoints/<step>/) of {what}"))
    return root


def load_decoder(path: str, flag: str = "--decoder_checkpoint") -> LoadedDecoder:
    """The visual decoder of a `decoder`-stage training run or of a converted Emu2-Gen."""
    converted = load_converted_decoder(_existing(path, flag))
    if converted is not None:
        return converted
    model_config, params = checkpointing.load_pretrained(str(_stage_run(path, "decoder", flag)))
    return LoadedDecoder(visual_decoder.VisualDecoderModel(model_config["decoder"]), params, str(path))


def load_video_decoder(path: str, flag: str = "--decoder_checkpoint") -> LoadedVideoDecoder:
    """The video decoder of a `video_decoder`-stage training run and its run config."""
    root = _stage_run(path, "video_decoder", flag)
    model_config, params = checkpointing.load_pretrained(str(root))
    return LoadedVideoDecoder(video_decoder.VideoDecoderModel(model_config["video_decoder"]), params,
                              run_config(path), str(path))
