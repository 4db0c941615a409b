"""The video-decoder stage (configs/video_decoder.py): config, data path, training step, sampler GIFs
and `python -m emu2_jax.autoencode --video`, on the tiny config."""
import io
import os
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from configs import gen, video_decoder
from emu2_jax import autoencode, metrics, tasks, train, video_io
from emu2_jax.data import layout, records
from emu2_jax.tasks import video_decoder as video_task
from tests import cli, tb_events


def test_configs_build():
    task = tasks.create(video_decoder.get_config("tiny"))
    assert isinstance(task, video_task.VideoDecoderTask)
    assert task.model_cfg.latent_shape == (4, 16, 16, 4) and task.config.trainable == ("unet", "cond_proj")
    real = video_task.model_config(video_decoder.get_config())
    assert real.latent_shape == (16, 64, 64, 4) and real.v_query == 64 and real.vision.width == 1792
    assert real.unet.unet.cross_attention_dim == 1024 and real.unet.unet.num_attention_heads == (5, 10, 20, 20)
    assert real.vae.scaling_factor == 0.18215


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((40, 48, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_clip_frames_are_stride_apart():
    config = video_decoder.get_config("tiny")
    config.data.video_frames, config.data.video_frame_stride = 3, 2
    opts = records.Options.from_config(config.data, image_size=16)
    process = records.Processor("video_decoder", None, opts)
    row = process({"frames": [_png(20 * i) for i in range(10)]}, np.random.default_rng(0))
    layout.check(layout.VIDEO_DECODER, {k: v[None] for k, v in row.items()}, frames=3, image_size=16,
                 decoder_size=32)
    values = np.round((row["target_frames"][:, 0, 0, 0] + 1) * 127.5 / 20)
    assert np.all(np.diff(values) == 2), values  # consecutive clip frames are 2 source frames apart
    short = process({"frames": [_png(0), _png(100)]}, np.random.default_rng(0))  # shorter than the span
    assert short["frames"].shape[0] == 3


def test_tiny_pipeline_yields_video_batches():
    task = tasks.create(video_decoder.get_config("tiny"))
    it = task.create_iterator(2, 0, 1)
    batch = next(it)
    it.close()
    layout.check(layout.VIDEO_DECODER, batch, rows=2, frames=4, image_size=task.model_cfg.vision.image_size,
                 decoder_size=32)
    assert -1.0 <= batch["target_frames"].min() < batch["target_frames"].max() <= 1.0
    assert np.abs(np.diff(batch["target_frames"], axis=1)).max() > 0.05  # frames of a clip differ (motion)


def test_train_step_trains_unet_and_projection_only():
    config = video_decoder.get_config("tiny")
    config.global_batch_size = 2
    trainer = train.create_trainer(config, devices=jax.devices()[:1])
    state = train.init_state(trainer, config)
    initial = jax.device_get(state.params)
    data = trainer.task.create_iterator(2, 0, 1)
    losses = []
    for _ in range(2):
        batch = train.make_global_batch(next(data), trainer.batch_sharding, 1, trainer.task.batch_layout)
        state, step_metrics = trainer.train_step(state, batch)
        losses.append(float(step_metrics["denoise_loss"]))
    data.close()
    final = jax.device_get(state.params)
    assert np.isfinite(losses).all() and 0.1 < losses[0] < 10, losses
    for component in ("visual", "vae"):
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(final[component]),
                                                         jax.tree.leaves(initial[component]))), component
    for component in ("unet", "cond_proj"):
        assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(final[component]),
                                                             jax.tree.leaves(initial[component]))), component


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A video-decoder workdir whose latest checkpoint (step 1) holds the tiny model's initial state."""
    path = tmp_path_factory.mktemp("video_run")
    return (path, *cli.initial_checkpoint(path, video_decoder.get_config("tiny")))


def test_sampler_writes_gifs_and_tensorboard(workdir, tmp_path):
    _, trainer, state = workdir
    config = video_decoder.get_config("tiny")
    config.video_decoder.sample_steps = 2
    task = tasks.create(config)
    sampler = task.create_sampler(trainer.mesh, trainer.rules, str(tmp_path))
    writer = metrics.SummaryWriter(str(tmp_path))
    sampler(2, state.params, writer)
    writer.close()
    assert sorted(os.listdir(tmp_path / "samples")) == ["video_000002_0.gif"]
    frames = video_io.read_video(tmp_path / "samples" / "video_000002_0.gif")
    assert len(frames) == 4 and frames[0].shape == (32, 32, 3)
    images = tb_events.read_images(tb_events.event_files(tmp_path)[0])
    strip = images[2]["samples/video_0"]  # the 4 frames in one row
    assert list(images) == [2] and strip.shape[0] >= 32 and strip.shape[1] >= 4 * 32


def test_autoencode_video_command(workdir, tmp_path):
    path, *_ = workdir
    clip = (np.random.default_rng(0).random((6, 40, 48, 3)) * 255).astype(np.uint8)
    source = tmp_path / "in.gif"
    video_io.write_video(source, clip)
    out = tmp_path / "out" / "out.mp4"
    done = cli.run([sys.executable, "-m", "emu2_jax.autoencode", f"--checkpoint={path}", f"--video={source}",
                    f"--out={out}", "--steps=2"], timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Wrote" in done.stderr and "(4 frames, 32x32)" in done.stderr
    frames = video_io.read_video(out)
    assert len(frames) == 4 and frames[0].shape == (32, 32, 3) and np.stack(frames).std() > 0
    with pytest.raises(SystemExit, match=r"--out=.*o.png: a clip is written as .gif or .mp4 or .webm"):
        autoencode.autoencode_video(str(path), str(source), str(tmp_path / "o.png"))
    with pytest.raises(SystemExit, match="--video=.*no such file"):
        autoencode.autoencode_video(str(path), str(tmp_path / "nope.gif"), str(tmp_path / "o.gif"))


def test_generate_video_command(workdir, tmp_path):
    """`generate --output_video`: the tiny gen LLM regresses 4 frames after [VIDEO], the tiny video
    decoder renders them; one clip per prompt, embeddings [B, F, v_query, Dv]."""
    video_run, *_ = workdir
    llm_run = cli.write_initial_checkpoint(tmp_path / "gen_run", gen.get_config("tiny"))
    out = tmp_path / "clip.gif"
    done = cli.run([sys.executable, "-m", "emu2_jax.generate", f"--checkpoint={llm_run}",
                    f"--decoder_checkpoint={video_run}", "--prompt=a dog running", "--prompt=waves",
                    f"--output_video={out}", "--steps=2", f"--save_embeddings={tmp_path / 'e.npy'}"], timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    for i in range(2):
        frames = np.stack(video_io.read_video(tmp_path / f"clip_{i}.gif"))
        assert frames.shape == (4, 32, 32, 3) and frames.std() > 0
    embeddings = np.load(tmp_path / "e.npy")
    llm_cfg = video_task.model_config(video_decoder.get_config("tiny"))
    assert embeddings.shape == (2, 4, llm_cfg.v_query, llm_cfg.vision.width) and np.isfinite(embeddings).all()
    refused = cli.run([sys.executable, "-m", "emu2_jax.generate", f"--checkpoint={llm_run}", "--prompt=x",
                       f"--output_video={tmp_path / 'x.gif'}"])
    assert refused.returncode != 0 and "--output_video needs --decoder_checkpoint" in refused.stderr
