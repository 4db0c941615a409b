"""Regenerates the shipped assets of the embedded dataset (run by hand, never at training time).

    python -m emu2_jax.data.embedded.make_assets images     # needs `pip install scikit-image`
    python -m emu2_jax.data.embedded.make_assets tokenizer  # retrains tokenizer/emu2_tiny.model
    python -m emu2_jax.data.embedded.make_assets eval       # media of the evaluation set (eval/)

`images` exports public-domain / CC0 photographs bundled with scikit-image (README.md lists each
source and licence) with the longer side at most 448 px; scikit-image is needed only here.
`tokenizer` trains the 1024-piece sentencepiece model from the shipped text. `eval` derives the
evaluation set's media from the photographs (eval/README.md).
"""
from __future__ import annotations

import io
import pathlib
import sys

import numpy as np
from PIL import Image

HERE = pathlib.Path(__file__).resolve().parent

# scikit-image loader -> shipped file; only photographs with a stated public-domain/CC0 licence.
PHOTOS = {
    "astronaut": "astronaut.jpg",
    "camera": "camera.jpg",
    "chelsea": "chelsea.jpg",
    "coffee": "coffee.jpg",
    "coins": "coins.png",
    "rocket": "rocket.jpg",
    "hubble_deep_field": "hubble.jpg",
    "clock": "clock.jpg",
    "retina": "retina.jpg",
    "brick": "brick.jpg",
    "grass": "grass.jpg",
    "gravel": "gravel.jpg",
    "immunohistochemistry": "ihc.jpg",
    "cell": "cell.jpg",
}
MAX_SIDE = 448


def export_images(out_dir: pathlib.Path = HERE / "images") -> None:
    import skimage.data  # pylint: disable=import-outside-toplevel

    out_dir.mkdir(parents=True, exist_ok=True)
    for loader, name in PHOTOS.items():
        pixels = np.asarray(getattr(skimage.data, loader)())
        if pixels.dtype != np.uint8:
            pixels = np.clip(pixels / max(pixels.max(), 1) * 255, 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        scale = MAX_SIDE / max(image.size)
        if scale < 1:
            image = image.resize((round(image.width * scale), round(image.height * scale)),
                                 Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        if name.endswith(".png"):
            image.save(buf, format="PNG", optimize=True)
        else:
            image.save(buf, format="JPEG", quality=85, optimize=True)
        (out_dir / name).write_bytes(buf.getvalue())
        print(f"{name}: {image.size} {image.mode} {len(buf.getvalue())} bytes")


# The evaluation set's media: COCO-named thumbnails (the VQAv2 / OKVQA layouts name images by COCO id)
# and short camera-motion clips for video QA, as GIFs and one folder of frames.
EVAL_COCO = {1: "astronaut.jpg", 2: "camera.jpg", 3: "chelsea.jpg", 4: "coffee.jpg", 5: "rocket.jpg",
             6: "clock.jpg"}
EVAL_VIDEOS = {"video0.gif": ("rocket.jpg", "zoom_in"), "video1.gif": ("chelsea.jpg", "pan_right"),
               "video2": ("coffee.jpg", "zoom_out")}
EVAL_SIDE, EVAL_FRAME_SIZE, EVAL_FRAMES = 160, 64, 6


def export_eval_media(out_dir: pathlib.Path = HERE / "eval") -> None:
    from emu2_jax.data.embedded import camera_motion_frames  # pylint: disable=import-outside-toplevel
    from emu2_jax.video_io import write_video  # pylint: disable=import-outside-toplevel

    coco = out_dir / "coco" / "val2014"
    coco.mkdir(parents=True, exist_ok=True)
    for cocoid, name in EVAL_COCO.items():
        image = Image.open(HERE / "images" / name).convert("RGB")
        image.thumbnail((EVAL_SIDE, EVAL_SIDE), Image.Resampling.BICUBIC)
        image.save(coco / f"COCO_val2014_{cocoid:012d}.jpg", format="JPEG", quality=85, optimize=True)
    for name, (photo, motion) in EVAL_VIDEOS.items():
        pixels = np.asarray(Image.open(HERE / "images" / photo).convert("RGB"))
        frames = camera_motion_frames(pixels, motion, EVAL_FRAMES, size=EVAL_FRAME_SIZE)
        path = out_dir / "videos" / name
        if name.endswith(".gif"):
            path.parent.mkdir(parents=True, exist_ok=True)
            write_video(path, np.stack(frames))
        else:
            path.mkdir(parents=True, exist_ok=True)
            for i, frame in enumerate(frames):
                Image.fromarray(frame).save(path / f"frame_{i:02d}.jpg", format="JPEG", quality=85)


def main(argv: list[str]) -> None:
    what = argv[1] if len(argv) > 1 else ""
    if what == "images":
        export_images()
    elif what == "tokenizer":
        from emu2_jax.data import tokenizer  # pylint: disable=import-outside-toplevel

        tokenizer.train_tiny_sentencepiece(tokenizer.EMBEDDED_MODEL)
    elif what == "eval":
        export_eval_media()
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
