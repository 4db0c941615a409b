r"""Run a checkpoint: text from interleaved image-text prompts, or images through the visual decoder.

    python -m emu2_jax.generate --checkpoint=DIR --prompt="[<IMG_PLH>]Describe the image in details:" \
        --image=a.png [--num_beams=5 --length_penalty=-1 --max_new_tokens=64]
    python -m emu2_jax.generate --checkpoint=DIR --prompt="[<IMG_PLH>]" --prompt="[<IMG_PLH>]what is it?" \
        --image=a.png --image=b.png --sample --temperature=0.7 --top_p=0.9 --seed=1
    python -m emu2_jax.generate --checkpoint=GEN --prompt="a red apple on a table" --output_image=apple.png \
        [--decoder_checkpoint=DIR --steps=50 --guidance=3.0 --negative_prompt="" --save_embeddings=x.npy]
    python -m emu2_jax.generate --checkpoint=DIR --prompt="a dog running on a beach" --output_video=dog.mp4 \
        --decoder_checkpoint=VIDEO_RUN [--steps=50 --guidance=3.0]
    python -m emu2_jax.generate --checkpoint=DIR --prompts_file=prompts.jsonl   # {"prompt", "images"} rows

`--checkpoint` is a training workdir of an LLM stage (or its checkpoints/ folder or one step's
folder) or a converted checkpoint (`python -m emu2_jax.convert`). Each `[<IMG_PLH>]` of the prompts
takes the next `--image`, in order over all prompts (a prompts file names each row's own images,
relative to the file). All prompts run as one batch; the answers print one per line, in order.

With `--output_image` each prompt becomes an image instead (Emu2-Gen): the LLM regresses the
image's visual embeddings after `[IMG]`, the visual decoder (of `--decoder_checkpoint`, default
`--checkpoint`: a converted Emu2-Gen holds both; or a decoder-stage workdir) draws them with
classifier-free guidance against the empty prompt's regression (or `--negative_prompt`'s). A
prompt that is exactly one image is autoencoded (conditioned on the image's own encoding). Several
prompts write `out_0.png`, `out_1.png`, ...; `--save_embeddings` writes the embeddings [B, n, Dv].
With `--output_video` each prompt becomes a clip: the LLM regresses, after `[VIDEO]`, the
`v_query` embeddings of each of the video decoder's frames (each frame laid out as in training,
`[IMG]` + embeddings + `[/IMG]`), and the video decoder of `--decoder_checkpoint` (a
`video_decoder`-stage run) renders them with guidance against its zero-clip condition, written as
GIF, MP4 or WebM by the suffix (`out_0.gif`, ... for several prompts).
Text decoding defaults to greedy; the release evaluates with `--num_beams=5 --length_penalty=-1`
and chats with `--num_beams=5 --length_penalty=2` (docs/inference.md).
"""
from __future__ import annotations

import json
import time
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging
from etils import epath
from PIL import Image

from emu2_jax import cli, video_io
from emu2_jax import sharding as sh
from emu2_jax.data import images as image_lib
from emu2_jax.data import tokenizer as tk
from emu2_jax.inference import checkpoints, images, prompts, text
from emu2_jax.models import video_decoder


def read_image(path: str, where: str) -> np.ndarray:
    try:
        return image_lib.read_image_file(path, where)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def read_prompts(prompt_flags: list[str], image_flags: list[str], prompts_file: str | None
                 ) -> list[tuple[str, list[np.ndarray]]]:
    """[(prompt text, its images)] from --prompt / --image or a JSONL prompts file, checked before loading."""
    if bool(prompt_flags) == bool(prompts_file):
        raise SystemExit("give --prompt (repeatable) or --prompts_file, not both and not neither")
    if prompts_file:
        if image_flags:
            raise SystemExit("--image goes with --prompt; a --prompts_file row names its own \"images\"")
        path = epath.Path(prompts_file).expanduser()
        if not path.is_file():
            raise SystemExit(f"--prompts_file={prompts_file}: no such file")
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text_, names = row["prompt"], row.get("images", [])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise SystemExit(f"--prompts_file={prompts_file}: line {number} is not a JSON object with a "
                                 f"\"prompt\" ({e})") from None
            rows.append((text_, [read_image(str(path.parent / n), f"--prompts_file line {number}: image {n}")
                                 for n in names]))
        if not rows:
            raise SystemExit(f"--prompts_file={prompts_file}: no prompts in it")
        return rows
    wanted = sum(p.count(tk.IMG_PLACEHOLDER) for p in prompt_flags)
    if wanted != len(image_flags):
        raise SystemExit(f"the prompts hold {wanted} {tk.IMG_PLACEHOLDER} but {len(image_flags)} --image were given")
    pixels = iter([read_image(p, f"--image={p}") for p in image_flags])
    return [(p, [next(pixels) for _ in range(p.count(tk.IMG_PLACEHOLDER))]) for p in prompt_flags]


def check_arguments(f: flags.FlagValues) -> dict[str, Any]:
    """The decoding options; SystemExit naming a wrong flag before anything is loaded."""
    options = cli.decoding_options(**{name: f[name].value for name in cli.DECODING_FLAGS})
    if f.steps < 1:
        raise SystemExit(f"--steps={f.steps}: must be >= 1")
    for flag in ("output_image", "output_video", "save_embeddings"):
        value = f[flag].value
        if value and epath.Path(value).expanduser().is_dir():
            raise SystemExit(f"--{flag}={value}: is a directory; name the file to write")
    if f.output_video:
        if f.output_image:
            raise SystemExit("give --output_image or --output_video, not both")
        if not f.decoder_checkpoint:
            raise SystemExit("--output_video needs --decoder_checkpoint: a video_decoder-stage run "
                             "(configs/video_decoder.py)")
        try:
            video_io.check_writable(f.output_video, "--output_video")
        except ValueError as e:
            raise SystemExit(str(e)) from None
    return options


def output_paths(out: str, count: int) -> list[str]:
    """`out` for one image; `stem_0.png`, `stem_1.png`, ... for several."""
    if count == 1:
        return [out]
    path = epath.Path(out)
    return [str(path.parent / f"{path.stem}_{i}{path.suffix or '.png'}") for i in range(count)]


def generate_images(loaded: checkpoints.LoadedLlm, rows: list[prompts.Row], raw: list[tuple[str, list]],
                    f: flags.FlagValues) -> np.ndarray:
    decoder = checkpoints.load_decoder(f.decoder_checkpoint or f.checkpoint)
    cfg, tok = loaded.model.config, loaded.tokenizer
    generator = images.ImageGenerator(
        loaded.model, loaded.params, decoder.model, decoder.params,
        prompt_fn=lambda t, ims: prompts.batch([prompts.build_row(tok, cfg, t, ims)], cfg, tok.pad_id))
    rng = jax.random.key(f.seed)
    autoencoding = [p.strip() == tk.IMG_PLACEHOLDER and len(ims) == 1 for p, ims in raw]
    outputs, embeddings = [None] * len(rows), [None] * len(rows)
    for autoencode in (True, False):  # one batch per mode
        index = [i for i, a in enumerate(autoencoding) if a == autoencode]
        if not index:
            continue
        if autoencode:
            size = decoder.model.config.vision.image_size
            pixels = image_lib.normalize(np.stack([image_lib.resize_for_encoder(raw[i][1][0], size) for i in index]))
            drawn, cond = generator.autoencode(pixels, rng, num_steps=f.steps, guidance_scale=f.guidance)
        else:
            batch = prompts.batch([rows[i] for i in index], cfg, tok.pad_id)
            drawn, cond = generator.generate(batch, rng, num_steps=f.steps, guidance_scale=f.guidance,
                                             negative_prompt=f.negative_prompt)
        for j, i in enumerate(index):
            outputs[i], embeddings[i] = drawn[j], cond[j]
    for path, image in zip(output_paths(f.output_image, len(rows)), outputs):
        epath.Path(path).expanduser().absolute().parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path, format="PNG")
        print(f"wrote {path} ({image.shape[1]}x{image.shape[0]})", flush=True)
    return np.stack(embeddings)


def generate_videos(loaded: checkpoints.LoadedLlm, rows: list[prompts.Row], f: flags.FlagValues) -> np.ndarray:
    """Writes one clip per prompt: the frame embeddings the LLM regresses after `[VIDEO]`, rendered by
    the video decoder with guidance against its zero-clip condition; returns them [B, F, v_query, Dv]."""
    decoder = checkpoints.load_video_decoder(f.decoder_checkpoint)
    llm_cfg, dec_cfg = loaded.model.config, decoder.model.config
    if (llm_cfg.v_query, llm_cfg.visual_embed_dim) != (dec_cfg.v_query, dec_cfg.vision.width):
        raise SystemExit(f"--decoder_checkpoint={f.decoder_checkpoint}: the video decoder takes {dec_cfg.v_query} x "
                         f"{dec_cfg.vision.width} embeddings per frame, the LLM regresses {llm_cfg.v_query} x "
                         f"{llm_cfg.visual_embed_dim}")
    batch = prompts.batch(rows, llm_cfg, loaded.tokenizer.pad_id)
    embeddings = images.generate_video_embeddings(loaded.model, loaded.params, batch, dec_cfg.num_frames)
    clips = video_decoder.sample_video(decoder.model, decoder.params, jax.random.key(f.seed),
                                       features=jax.numpy.asarray(embeddings), num_steps=f.steps,
                                       guidance_scale=f.guidance)
    fps = float(decoder.run_config.video_decoder.sample_fps)
    for path, clip in zip(output_paths(f.output_video, len(rows)), video_io.to_uint8(jax.device_get(clips))):
        epath.Path(path).expanduser().absolute().parent.mkdir(parents=True, exist_ok=True)
        video_io.write_video(path, clip, fps=fps)
        print(f"wrote {path} ({clip.shape[0]} frames, {clip.shape[2]}x{clip.shape[1]})", flush=True)
    return embeddings


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(cli.OwnInfoOnly())
    f = flags.FLAGS
    options = check_arguments(f)
    raw = read_prompts(f.prompt, f.image, f.prompts_file)
    mesh = sh.create_mesh([int(x) for x in f.mesh_shape.split(",")]) if f.mesh_shape else None
    started = time.perf_counter()
    loaded = checkpoints.load_llm(f.checkpoint, tokenizer=f.tokenizer, mesh=mesh)
    cfg, tok = loaded.model.config, loaded.tokenizer
    try:
        rows = [prompts.build_row(tok, cfg, p, ims) for p, ims in raw]
    except ValueError as e:
        raise SystemExit(str(e)) from None
    logging.info("Loaded %s in %.1fs; %d prompt(s), longest %d tokens.", loaded.path, time.perf_counter() - started,
                 len(rows), max(len(r.ids) for r in rows))
    started = time.perf_counter()
    if f.output_image:
        embeddings = generate_images(loaded, rows, raw, f)
    elif f.output_video:
        embeddings = generate_videos(loaded, rows, f)
    else:
        batch = prompts.batch(rows, cfg, tok.pad_id)
        if f.save_embeddings:
            embeddings = images.generate_image_embeddings(loaded.model, loaded.params, batch, mesh=mesh)
        try:
            generated = text.generate_text(loaded.model, loaded.params, batch, rng=jax.random.key(f.seed), mesh=mesh,
                                           stop_ids=(tok.eos_id,), **options)
        except ValueError as e:
            raise SystemExit(str(e)) from None
        new_tokens = int(generated.lengths.sum())
        seconds = time.perf_counter() - started
        logging.info("%d new tokens in %.1fs (%.1f tokens/s, compilation included).", new_tokens, seconds,
                     new_tokens / max(seconds, 1e-9))
        for row in generated.rows():
            print(tok.decode(row, skip_special_tokens=True).strip(), flush=True)
    if f.save_embeddings:
        epath.Path(f.save_embeddings).expanduser().absolute().parent.mkdir(parents=True, exist_ok=True)
        np.save(f.save_embeddings, np.asarray(embeddings, np.float32))
        print(f"wrote {f.save_embeddings} {tuple(np.shape(embeddings))}", flush=True)


if __name__ == "__main__":  # flags only for the command, so the module imports next to others' flags
    flags.DEFINE_string("checkpoint", None, "LLM-stage training workdir / step folder, or a converted checkpoint.")
    flags.DEFINE_multi_string("prompt", [], "A prompt; [<IMG_PLH>] takes the next --image. Repeat for a batch.")
    flags.DEFINE_multi_string("image", [], "Images for the prompts' [<IMG_PLH>], in order.")
    flags.DEFINE_string("prompts_file", None, "JSONL of {\"prompt\": ..., \"images\": [paths relative to it]}.")
    flags.DEFINE_string("tokenizer", None, "sentencepiece tokenizer.model (default: the checkpoint's or run's).")
    cli.define_decoding_flags(max_new_tokens=64)  # the release evaluates with --num_beams=5 --length_penalty=-1
    flags.DEFINE_integer("seed", 0, "Seed of sampling and of the image latents.")
    flags.DEFINE_string("output_image", None, "Generate images instead of text; PNG path.")
    flags.DEFINE_string("output_video", None, "Generate clips instead of text; .gif, .mp4 or .webm path.")
    flags.DEFINE_string("decoder_checkpoint", None, "Visual decoder (default --checkpoint); the video decoder's run "
                        "for --output_video.")
    flags.DEFINE_integer("steps", 50, "Euler sampling steps.")
    flags.DEFINE_float("guidance", 3.0, "Classifier-free guidance scale.")
    flags.DEFINE_string("negative_prompt", "", "Unconditional prompt of the guidance (default: empty).")
    flags.DEFINE_string("save_embeddings", None, "Write the regressed visual embeddings [B, n, Dv] (.npy).")
    flags.DEFINE_string("mesh_shape", "", "data,fsdp,tensor device mesh, e.g. 1,-1,1 (default: one device).")
    flags.mark_flags_as_required(["checkpoint"])
    app.run(main)
