"""The LLM stages (stage1, stage2, chat, gen, emu1_chat): Emu2Model trained on packed rows of text
and images, text cross-entropy plus visual-embedding regression (docs/model.md, docs/batch.md).

Samples: greedy captions of a few images (`config.sample_pairs`, default the embedded pairs) written
to `samples/step_<N>.json` and, with their images, to TensorBoard; with a visual decoder
(`config.sample_decoder_checkpoint`) the reference captions are also drawn as images (a PNG grid).
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from emu2_jax import metrics
from emu2_jax import sharding as sh
from emu2_jax.convert.layouts import emu2_config_from_json
from emu2_jax.convert.stream import CONFIG_FILE
from emu2_jax.data import images as image_lib
from emu2_jax.data import layout, pipeline
from emu2_jax.data import tokenizer as tokenizer_lib
from emu2_jax.inference import checkpoints, images, prompts, text
from emu2_jax.models import emu2, presets

PyTree = Any
Sampler = Callable[[int, PyTree, metrics.SummaryWriter | None], None]


def _flatten_overrides(overrides: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    """{'llm': {'lora_rank': 16}, 'dtype': 'bfloat16'} -> {'llm.lora_rank': 16, 'dtype': 'bfloat16'}."""
    out = {}
    for key, value in overrides.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.update(_flatten_overrides(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def model_config(config: ml_collections.ConfigDict) -> emu2.Emu2Config:
    """The preset `config.model` with `config.model_overrides` applied; when `config.init_from` is a
    converted checkpoint (`python -m emu2_jax.convert`), the model it holds replaces the preset."""
    overrides = _flatten_overrides(config.model_overrides)
    if overrides.get("remat_policy") == "auto":
        # Not planned (emu2_jax.plan resolves it before training): the model is built to be run or
        # inspected, where remat does not apply.
        overrides["remat_policy"] = "full"
    saved = os.path.join(config.get("init_from") or "", CONFIG_FILE)
    if config.get("init_from") and os.path.isfile(saved):
        with open(saved) as f:
            converted = json.load(f)
        if "emu2" in converted:
            return presets.apply_overrides(emu2_config_from_json(converted["emu2"]), config.init_from, **overrides)
    return presets.get_config(config.model, **overrides)


def load_tokenizer(config: ml_collections.ConfigDict, model_cfg: emu2.Emu2Config) -> tokenizer_lib.Tokenizer:
    """The tokenizer whose vocabulary (with or without the two chat tokens) matches the model's."""
    try:
        return tokenizer_lib.tokenizer_for_vocab(config.data.tokenizer_path or None, model_cfg.llm.vocab_size)
    except ValueError as e:
        raise ValueError(f"{e} (--config.data.tokenizer_path)") from None


def batch_sizes(config: ml_collections.ConfigDict, model_cfg: emu2.Emu2Config) -> dict[str, int]:
    """The named sizes of the LLM batch layout (all but `rows`; `pixel_row` follows from `image_size`)."""
    return {"seq_len": config.seq_len, "slots": max(config.max_images_per_row, 1),
            "image_size": model_cfg.vision.image_size}


@dataclasses.dataclass(frozen=True)
class LlmTask:
    """Emu2Model, text cross-entropy + visual-embedding regression."""
    config: ml_collections.ConfigDict
    model_cfg: emu2.Emu2Config
    model: emu2.Emu2Model
    components = emu2.COMPONENTS
    batch_layout = layout.LLM
    metric_names = ("text_loss", "image_loss", "text_accuracy")

    @classmethod
    def create(cls, config: ml_collections.ConfigDict) -> LlmTask:
        model_cfg = model_config(config)
        return cls(config=config, model_cfg=model_cfg, model=emu2.Emu2Model(model_cfg))

    @property
    def lora(self) -> bool:
        return self.model_cfg.llm.lora_rank > 0

    def dummy_batch(self, rows: int) -> dict[str, jax.ShapeDtypeStruct]:
        return layout.abstract(layout.LLM, rows=rows, **batch_sizes(self.config, self.model_cfg))

    def loss_normalizers(self, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """Supervised text / image positions of the whole batch [accum, rows, ...]."""
        return {"text": jnp.maximum(batch["text_loss_mask"].sum(), 1.0),
                "image": jnp.maximum(batch["image_loss_mask"].sum(), 1.0)}

    def micro_loss(self, params: PyTree, micro: Mapping[str, jax.Array], normalizers: Mapping[str, jax.Array],
                   rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Each microbatch's loss is weighted by its share of the batch's supervised tokens, so the
        accumulated gradient equals that of the whole batch."""
        del rng  # deterministic
        text_weight, image_weight = self.config.text_loss_weight, self.config.image_loss_weight
        _, m = self.model.apply({"params": params}, micro, text_weight=text_weight, image_weight=image_weight,
                                text_loss_chunk=self.config.text_loss_chunk, method=emu2.Emu2Model.losses)
        text_share, image_share = m["text_tokens"] / normalizers["text"], m["image_tokens"] / normalizers["image"]
        parts = {"text_loss": m["text_loss"] * text_share, "image_loss": m["image_loss"] * image_share,
                 "text_accuracy": m["text_accuracy"] * text_share}
        return text_weight * parts["text_loss"] + image_weight * parts["image_loss"], parts

    def counts(self, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        return {"tokens": (batch["segment_ids"] > 0).sum().astype(jnp.float32),
                "images": batch["image_valid"].sum().astype(jnp.float32)}

    def training_flops(self, abstract_params: PyTree) -> float:
        """metrics.training_flops of one optimizer step, causal attention counted at half (MaxText's
        convention: the mean number of keys a query attends is seq_len / 2)."""
        del abstract_params  # analytic
        config, rows = self.config, self.config.global_batch_size
        return metrics.training_flops(self.model_cfg, tokens=rows * config.seq_len, seq_len=config.seq_len / 2,
                                      images=rows * max(config.max_images_per_row, 1),
                                      trainable=tuple(config.trainable), lora=self.lora)

    def create_iterator(self, batch_size: int, shard_index: int, shard_count: int):
        config = self.config
        return pipeline.create_train_iterator(
            config.data, tokenizer=load_tokenizer(config, self.model_cfg), seq_len=config.seq_len,
            batch_size=batch_size, image_size=self.model_cfg.vision.image_size, n_query=self.model_cfg.n_query,
            v_query=self.model_cfg.v_query, max_images_per_row=config.max_images_per_row, seed=config.seed,
            shard_index=shard_index, shard_count=shard_count)

    def create_sampler(self, mesh: jax.sharding.Mesh, rules: sh.Rules, workdir: str) -> Sampler:
        """`sample(step, params, writer)`: greedy captions of the sample images, written by process 0."""
        config, model_cfg = self.config, self.model_cfg
        tokenizer = load_tokenizer(config, model_cfg)
        samples, pixels = load_sample_images(config, model_cfg.vision.image_size)
        prompt = sample_prompt_batch(config.sample_prompt, tokenizer, model_cfg, pixels)
        stops = (tokenizer.eos_id, tokenizer.token_to_id(tokenizer_lib.EOC))

        images_written = False  # the inputs never change: once per process is enough
        draw = self._image_sampler(tokenizer, [s["reference"] for s in samples], workdir)

        def sample(step: int, params: PyTree, writer: metrics.SummaryWriter | None) -> None:
            nonlocal images_written
            if draw is not None:
                draw(step, params, writer)
            new_tokens = text.generate_text(self.model, params, prompt, max_new_tokens=config.sample_max_new_tokens,
                                            stop_ids=stops, mesh=mesh, rules=rules).rows()
            if jax.process_index() != 0:
                return
            path, captions = write_samples(workdir, step, samples, new_tokens, tokenizer)
            logging.info("Wrote %d caption samples to %s; first: %r", len(captions), path, captions[0])
            if writer:
                if not images_written:
                    writer.images(step, {f"samples/{i}": image for i, image in enumerate(pixels)})
                    images_written = True
                writer.text(step, {f"samples/{i}": f"{caption}\n\nreference: {s['reference']} ({s['image']})"
                                   for i, (s, caption) in enumerate(zip(samples, captions))})

        return sample


    def _image_sampler(self, tokenizer: tokenizer_lib.Tokenizer, captions: list[str], workdir: str
                       ) -> Sampler | None:
        """With `config.sample_decoder_checkpoint`: the sample captions drawn through that visual decoder
        (`samples/images_step_<N>.png`, one image per caption, and TensorBoard `samples/generated`)."""
        config, model_cfg = self.config, self.model_cfg
        if not config.get("sample_decoder_checkpoint"):
            return None
        decoder = checkpoints.load_decoder(config.sample_decoder_checkpoint)
        make_prompt = lambda t, ims: prompts.batch([prompts.build_row(tokenizer, model_cfg, t, ims)], model_cfg,
                                                   tokenizer.pad_id)
        batch = prompts.batch([prompts.build_row(tokenizer, model_cfg, c) for c in captions], model_cfg,
                              tokenizer.pad_id)
        out_dir = os.path.join(workdir, "samples")

        def draw(step: int, params: PyTree, writer: metrics.SummaryWriter | None) -> None:
            generator = images.ImageGenerator(self.model, params, decoder.model, decoder.params, make_prompt)
            drawn, _ = generator.generate(batch, jax.random.key(step), num_steps=config.sample_decoder_steps)
            if jax.process_index() != 0:
                return
            grid = image_lib.image_grid([list(drawn)], decoder.model.config.decoder_image_size)
            os.makedirs(out_dir, exist_ok=True)
            Image.fromarray(grid).save(os.path.join(out_dir, f"images_step_{step}.png"))
            if writer:
                writer.images(step, {"samples/generated": grid})

        return draw


def load_sample_images(config: ml_collections.ConfigDict, image_size: int) -> tuple[list[dict], np.ndarray]:
    """([{'image': name, 'reference': caption}], uint8 encoder inputs [K, S, S, 3]) of the sample set.

    `config.sample_pairs`: a JSONL of {"image": path relative to the file, "caption": ...} (held-out
    images); empty means the embedded dataset's pairs, one per image.
    """
    if config.sample_pairs:
        path, image_dir = config.sample_pairs, os.path.dirname(config.sample_pairs)
    else:
        path, image_dir = tokenizer_lib.EMBEDDED_DIR / "pairs.jsonl", tokenizer_lib.EMBEDDED_DIR / "images"
    rows, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for row in (json.loads(line) for line in f if line.strip()):
            if row["image"] not in seen:
                seen.add(row["image"])
                rows.append(row)
    rows = rows[:config.num_samples]
    pixels = []
    for row in rows:
        with open(os.path.join(image_dir, row["image"]), "rb") as f:
            decoded = image_lib.decode_image(f.read())
        pixels.append(image_lib.resize_for_encoder(decoded, image_size))
    return [{"image": r["image"], "reference": r["caption"]} for r in rows], np.stack(pixels)


def sample_prompt_batch(prompt: str, tokenizer: tokenizer_lib.Tokenizer, model_cfg: emu2.Emu2Config,
                        pixels: np.ndarray) -> dict[str, np.ndarray]:
    """One row per sample image (uint8 [S, S, 3]): `prompt` with its `[<IMG_PLH>]` expanded to the image's tokens."""
    if prompt.count(tokenizer_lib.IMG_PLACEHOLDER) != 1:
        raise ValueError(f"sample_prompt {prompt!r} must hold exactly one {tokenizer_lib.IMG_PLACEHOLDER}")
    image = tokenizer_lib.IMG + tokenizer_lib.IMAGE * model_cfg.n_query + tokenizer_lib.IMG_END
    ids = tokenizer.encode(prompt.replace(tokenizer_lib.IMG_PLACEHOLDER, image))
    return {**text.left_pad([ids] * len(pixels), tokenizer.pad_id), "images": image_lib.to_pixel_rows(pixels)[:, None],
            "image_valid": np.ones((len(pixels), 1), bool), "image_is_frame": np.zeros((len(pixels), 1), bool)}


def write_samples(workdir: str, step: int, samples: list[dict], new_tokens: list[list[int]],
                  tokenizer: tokenizer_lib.Tokenizer) -> tuple[str, list[str]]:
    """Writes samples/step_<step>.json ({image, reference, caption} per sample); returns (path, captions)."""
    out = [{**s, "caption": tokenizer.decode(row, skip_special_tokens=True)} for s, row in zip(samples, new_tokens)]
    path = os.path.join(workdir, "samples", f"step_{step}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"step": step, "samples": out}, f, indent=1)
    return path, [o["caption"] for o in out]
