"""The video-decoder stage (configs/video_decoder.py): config, data path, training step, sampler GIFs,
`python -m emu2_jax.autoencode --video`, and the start from converted SD-2.1 and Emu2 weights (the 2D UNet
inflated), on the tiny config."""
import io
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from configs import gen, video_decoder
from emu2_jax import autoencode, checkpointing, metrics, tasks, train, video_io
from emu2_jax.convert.__main__ import convert
from emu2_jax.data import layout, records
from emu2_jax.models import unet as unet_lib
from emu2_jax.models import unet3d as unet3d_lib
from emu2_jax.tasks import video_decoder as video_task
from tests import cli, tb_events
from tests.models.test_unet import torch_unet
from tests.models.test_unet3d import TINY_SD21_DIFFUSERS
from tests.models.test_vae import TINY_VAE_DIFFUSERS, torch_vae


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
def sd21_start(tmp_path_factory):
    """What `--config.init_from=$SD21 --config.init_components=unet,vae,visual=$EMU2` reads, built as a
    user would: a diffusers SD-2.1-style folder (2D `unet/`, `vae/`; the tiny video preset's spatial
    topology) converted by `python -m emu2_jax.convert`, and a params-only checkpoint holding `visual`.
    Returns (config, trainer on a 2-device FSDP mesh, the converted 2D params, the saved visual)."""
    root = tmp_path_factory.mktemp("sd21_start")
    torch_unet(dict(TINY_SD21_DIFFUSERS, cross_attention_dim=64), seed=1).save_pretrained(root / "sd21" / "unet")
    torch_vae(TINY_VAE_DIFFUSERS, seed=2).save_pretrained(root / "sd21" / "vae")
    convert(str(root / "sd21"), str(root / "sd21_jax"), log=lambda _: None)
    _, converted = checkpointing.load_pretrained(str(root / "sd21_jax"))

    config = video_decoder.get_config("tiny")
    config.mesh_shape = (1, -1, 1)  # FSDP over 2 devices: the loaded params must land split as the model says
    trainer = train.create_trainer(config, devices=jax.devices()[:2])
    rng = np.random.default_rng(3)
    visual = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype),
                          trainer.abstract_state.params["visual"])
    checkpointing.save_params(root / "emu2", {"visual": visual})
    config.init_from = str(root / "sd21_jax")
    config.init_components = f"unet,vae,visual={root / 'emu2'}"
    return config, trainer, converted, visual


def _flat(tree) -> dict:
    return traverse_util.flatten_dict(jax.device_get(tree))


def test_video_unet_is_inflated_from_a_converted_2d_unet(sd21_start, caplog, monkeypatch):
    config, trainer, converted, visual = sd21_start
    assert train.validate_config(config) == []
    # init_state's own fresh init as it hands it to the loader (another init of the model: a minute on CPU).
    handed = []
    load_params = checkpointing.load_params

    def spy(*args, fresh_params=None):
        handed.append(jax.device_get(fresh_params))
        return load_params(*args, fresh_params=fresh_params)

    monkeypatch.setattr(checkpointing, "load_params", spy)
    with caplog.at_level("INFO"):
        params = train.init_state(trainer, config).params
    assert len(handed) == 2  # one load per checkpoint: init_from (unet, vae) first, nothing loaded before it
    fresh = handed[0]["unet"]

    unet, unet_2d, unet_fresh = _flat(params["unet"]), _flat(converted["unet"]), _flat(fresh)
    temporal = sorted(set(unet) - set(unet_2d))
    assert temporal and all(unet3d_lib.is_temporal(p) for p in temporal)
    assert not any(unet3d_lib.is_temporal(p) for p in unet_2d)
    for p, value in unet_2d.items():  # spatial: exactly the 2D UNet's
        np.testing.assert_array_equal(unet[p], value, err_msg="/".join(p))
    for p in temporal:  # temporal: the fresh init
        np.testing.assert_array_equal(unet[p], unet_fresh[p], err_msg="/".join(p))
    assert any(np.std(unet_fresh[p]) > 0 for p in temporal)  # random values: the comparison bites
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params["vae"]), jax.device_get(converted["vae"]))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params["visual"]), visual)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params["cond_proj"]), handed[0]["cond_proj"])
    # Placed as the model's shardings say (restored onto them, not gathered), some split over both devices.
    shardings = jax.tree.leaves(trainer.param_shardings)
    assert all(x.sharding.is_equivalent_to(s, x.ndim) for x, s in zip(jax.tree.leaves(params), shardings))
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(params["unet"]))
    sizes = lambda paths: sum(unet[p].size for p in paths)  # noqa: E731
    assert (f"{len(unet_2d)} spatial params ({sizes(unet_2d)} values) loaded, {len(temporal)} temporal params "
            f"({sizes(temporal)} values) kept at their initialisation") in caplog.text
    assert f"{config.init_from} (unet, vae); {config.init_components.split('=')[1]} (visual); freshly " \
           f"initialised: cond_proj." in caplog.text

    # At step 0 the video UNet is the 2D UNet on every frame.
    unet_cfg = trainer.model_cfg.unet
    batch, frames, size = 2, config.data.video_frames, 8
    sample = jax.random.normal(jax.random.key(1), (batch, frames, size, size, 4))
    context = jax.random.normal(jax.random.key(2), (batch, 5, unet_cfg.unet.cross_attention_dim))
    timesteps = jnp.array([999.0, 10.0])
    out = jax.jit(unet3d_lib.UNet3D(unet_cfg).apply)({"params": params["unet"]}, sample, timesteps, context)
    ref = jax.jit(unet_lib.UNet(unet_cfg.unet).apply)(
        {"params": converted["unet"]}, sample.reshape(batch * frames, size, size, 4),
        jnp.repeat(timesteps, frames), jnp.repeat(context, frames, axis=0))
    out, ref = np.asarray(out).reshape(ref.shape), np.asarray(ref)
    assert np.abs(ref).mean() > 0.1
    assert np.abs(out - ref).max() <= 1e-5


def test_missing_spatial_or_temporal_params_are_still_errors(sd21_start, tmp_path):
    config, trainer, converted, _ = sd21_start
    abstract = trainer.abstract_state.params
    fresh = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype, device=s.sharding), abstract)
    unet_2d = _flat(converted["unet"])
    del unet_2d[("conv_in", "kernel")]
    checkpointing.save_params(tmp_path / "no_conv_in", {"unet": traverse_util.unflatten_dict(unet_2d)})
    with pytest.raises(ValueError, match=r"^init_from=\S+no_conv_in: parameter unet/conv_in/kernel is missing in "
                                         r"the checkpoint$"):
        checkpointing.load_params(str(tmp_path / "no_conv_in"), abstract, ["unet"], fresh_params=fresh)
    # A 3D checkpoint short of one temporal param is not a 2D one: nothing is inflated.
    unet_3d = _flat(fresh["unet"])
    del unet_3d[("transformer_in", "proj_out", "kernel")]
    checkpointing.save_params(tmp_path / "no_proj_out", {"unet": traverse_util.unflatten_dict(unet_3d)})
    with pytest.raises(ValueError, match="parameter unet/transformer_in/proj_out/kernel is missing"):
        checkpointing.load_params(str(tmp_path / "no_proj_out"), abstract, ["unet"], fresh_params=fresh)
    # A 2D UNet of another topology (a param the 3D UNet lacks) is refused, naming the param.
    extra = _flat(converted["unet"])
    extra[("add_embedding", "kernel")] = np.zeros((2, 2), np.float32)
    checkpointing.save_params(tmp_path / "extra", {"unet": traverse_util.unflatten_dict(extra)})
    with pytest.raises(ValueError, match="unet: 2D UNet param add_embedding/kernel has no place in the 3D UNet"):
        checkpointing.load_params(str(tmp_path / "extra"), abstract, ["unet"], fresh_params=fresh)
    # Without the fresh params (`load_pretrained`) a 2D UNet does not inflate: temporal params are missing.
    with pytest.raises(ValueError, match=r"parameter unet/\S*(temp_|transformer_in)\S* is missing in the"):
        checkpointing.load_params(config.init_from, abstract, ["unet"])


@pytest.mark.parametrize("init_from, components, expected", [
    ("/ckpt/sd21", "unet,vae,visual=", "entry 'visual=' has an empty path (name=PATH)"),
    ("/ckpt/sd21", "unet,vae,nosuch", "unknown component(s) ['nosuch'] of task 'video_decoder' "
                                      "(it has visual, cond_proj, unet, vae)"),
    ("/ckpt/sd21", "unet,=/ckpt/emu2", "entry '=/ckpt/emu2' names no component"),
    ("/ckpt/sd21", "unet,unet=/ckpt/other", "entry 'unet=/ckpt/other': 'unet' is given twice"),
    ("", "unet,visual=/ckpt/emu2", "entry 'unet' has no path and --config.init_from is empty; write unet=PATH"),
])
def test_bad_init_components_are_one_line_errors(init_from, components, expected):
    config = video_decoder.get_config("tiny")
    config.init_from, config.init_components = init_from, components
    assert train.validate_config(config) == [f"--config.init_components={components!r}: {expected}"]


def test_init_sources_group_components_by_checkpoint():
    config = video_decoder.get_config("tiny")
    config.init_from, config.init_components = "/ckpt/sd21", " unet , vae,visual = /ckpt/emu2 "
    assert train.init_sources(config) == {"/ckpt/sd21": ["unet", "vae"], "/ckpt/emu2": ["visual"]}
    config.init_from, config.init_components = "", "unet,vae"  # the config's defaults, nothing to load from
    assert train.init_sources(config) == {}
    config.init_components = "visual=/ckpt/emu2"
    assert train.init_sources(config) == {"/ckpt/emu2": ["visual"]}


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
