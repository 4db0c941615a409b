r"""Image -> Emu2 encoder -> visual decoder -> image, with a trained `decoder`-stage checkpoint;
clip -> Emu2 encoder -> video decoder -> GIF / MP4, with a `video_decoder`-stage checkpoint.

    python -m emu2_jax.autoencode --checkpoint=/tmp/decoder --image=in.png --out=out.png \
        [--steps=50 --guidance=3.0 --seed=0]
    python -m emu2_jax.autoencode --checkpoint=/tmp/video --video=clip.gif|clip.mp4|frames_dir --out=out.mp4

A clip (`--video`: an animated GIF, a video file or a folder of frame images in name order) is sampled uniformly to
the checkpoint's `data.video_frames` frames, each centre-cropped square; the frames' pooled embeddings
condition Euler v-prediction sampling of all frames at once with classifier-free guidance against the
zero-clip encoding, the VAE decodes each frame and the clip is written: an animated GIF, or H.264
MP4 / VP9 WebM by `--out`'s suffix (those need PyAV: `pip install -e ".[video]"`).

`--checkpoint` is a (video) decoder-stage training workdir, its `checkpoints/` folder or one step's
folder in it (the latest step is used for the first two), or, for images, an Emu2-Gen checkpoint
converted by `python -m emu2_jax.convert` (its own model config is used). The image is resized
(squash) and normalised for the encoder; its pooled embeddings condition Euler sampling with
classifier-free guidance against the zero-image encoding (docs/model.md#image-generation,
#visual-decoder); the VAE decodes the latents and the PNG is written at the decoder's resolution.
"""
from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging
from etils import epath
from PIL import Image

from emu2_jax import cli, video_io
from emu2_jax.data import images as image_lib
from emu2_jax.inference import checkpoints
from emu2_jax.models import video_decoder, visual_decoder


def read_image(path: str, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """(normalised encoder pixels [1, size, size, 3], original (height, width)); SystemExit if unreadable."""
    try:
        pixels = image_lib.read_image_file(path, f"--image={path}")
    except ValueError as e:
        raise SystemExit(str(e)) from None
    return image_lib.normalize(image_lib.resize_for_encoder(pixels, size))[None], pixels.shape[:2]


def read_clip(path: str, num_frames: int, size: int) -> np.ndarray:
    """Normalised encoder frames [1, num_frames, size, size, 3] of a GIF or frame folder, sampled
    uniformly and centre-cropped square; SystemExit naming `--video` if unreadable."""
    try:
        frames = video_io.read_video(path)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    picked = [frames[i] for i in image_lib.sample_frame_indices(len(frames), num_frames)]
    side = min(picked[0].shape[:2])
    crops = [image_lib.decoder_target(f, decoder_size=side, encoder_size=size, rng=None)["image"] for f in picked]
    return np.stack([image_lib.normalize(c) for c in crops])[None]


def check_arguments(out: str, steps: int, kind: str = "PNG") -> None:
    """SystemExit naming the argument, before anything is loaded or sampled (else `--steps=0` divides
    by zero and a directory as `--out` fails only after sampling)."""
    if steps < 1:
        raise SystemExit(f"--steps={steps}: must be >= 1")
    if epath.Path(out).is_dir():
        raise SystemExit(f"--out={out}: is a directory; name the {kind} file to write")
    if kind != "PNG":
        try:
            video_io.check_writable(out, "--out")
        except ValueError as e:
            raise SystemExit(str(e)) from None


def autoencode(checkpoint: str, image: str, out: str, *, steps: int = 50, guidance: float = 3.0,
               seed: int = 0) -> dict[str, Any]:
    """Writes the reconstruction of `image` to `out` (PNG); returns what was done (for printing)."""
    check_arguments(out, steps)
    decoder = checkpoints.load_decoder(checkpoint, "--checkpoint")
    model = decoder.model
    pixels, original = read_image(image, model.config.vision.image_size)
    logging.info("Checkpoint %s; encoder %d px, %d tokens; decoder %d px; %d Euler steps, guidance %.2f",
                 checkpoint, model.config.vision.image_size, model.config.n_query, model.config.decoder_image_size,
                 steps, guidance)
    started = time.perf_counter()
    decoded = visual_decoder.sample_images(model, decoder.params, jax.numpy.asarray(pixels), jax.random.key(seed),
                                           num_steps=steps, guidance_scale=guidance, original_size=original)
    result = visual_decoder.to_uint8(jax.device_get(decoded))[0]
    epath.Path(out).absolute().parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(result).save(out, format="PNG")
    info = {"checkpoint": checkpoint, "out": out, "size": result.shape[:2], "seconds": time.perf_counter() - started}
    logging.info("Wrote %s (%dx%d) in %.1fs.", out, result.shape[1], result.shape[0], info["seconds"])
    return info


def write_clip(out: str, clip: np.ndarray, fps: float) -> None:
    """uint8 frames [F, H, W, 3] as the GIF / MP4 / WebM `out`, its folder created."""
    epath.Path(out).absolute().parent.mkdir(parents=True, exist_ok=True)
    video_io.write_video(out, clip, fps=fps)
    logging.info("Wrote %s (%d frames, %dx%d).", out, clip.shape[0], clip.shape[2], clip.shape[1])


def autoencode_video(checkpoint: str, video: str, out: str, *, steps: int = 50, guidance: float = 3.0,
                     seed: int = 0) -> dict[str, Any]:
    """Writes the rendering of clip `video` from its own encoding to `out` (GIF, MP4 or WebM)."""
    check_arguments(out, steps, "video")
    decoder = checkpoints.load_video_decoder(checkpoint, "--checkpoint")
    cfg = decoder.model.config
    frames = read_clip(video, cfg.num_frames, cfg.vision.image_size)
    logging.info("Checkpoint %s; %d frames, encoder %d px, %d tokens per frame; decoder %d px; "
                 "%d Euler steps, guidance %.2f", checkpoint, cfg.num_frames, cfg.vision.image_size,
                 cfg.v_query, cfg.decoder_image_size, steps, guidance)
    started = time.perf_counter()
    decoded = video_decoder.sample_video(decoder.model, decoder.params, jax.random.key(seed),
                                         frames=jax.numpy.asarray(frames), num_steps=steps, guidance_scale=guidance)
    clip = video_io.to_uint8(jax.device_get(decoded))[0]
    write_clip(out, clip, float(decoder.run_config.video_decoder.sample_fps))
    return {"checkpoint": checkpoint, "out": out, "frames": clip.shape[0], "size": clip.shape[1:3],
            "seconds": time.perf_counter() - started}


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(cli.OwnInfoOnly())
    f = flags.FLAGS
    if (f.image is None) == (f.video is None):
        raise app.UsageError("give exactly one of --image (visual decoder) and --video (video decoder)")
    if f.video is not None:
        autoencode_video(f.checkpoint, f.video, f.out, steps=f.steps, guidance=f.guidance, seed=f.seed)
    else:
        autoencode(f.checkpoint, f.image, f.out, steps=f.steps, guidance=f.guidance, seed=f.seed)


if __name__ == "__main__":  # flags only for the command, so the module imports next to others' flags
    flags.DEFINE_string("checkpoint", None, "Decoder-stage workdir, its checkpoints/ folder or a step folder.")
    flags.DEFINE_string("image", None, "Input image (any format PIL reads).")
    flags.DEFINE_string("video", None, "Input clip: an animated GIF, a video file (PyAV) or a folder of frame images.")
    flags.DEFINE_string("out", None, "Output path: PNG for --image; .gif, .mp4 or .webm for --video.")
    flags.DEFINE_integer("steps", 50, "Euler sampling steps.")
    flags.DEFINE_float("guidance", 3.0, "Classifier-free guidance scale.")
    flags.DEFINE_integer("seed", 0, "Seed of the initial latents.")
    flags.mark_flags_as_required(["checkpoint", "out"])
    app.run(main)
