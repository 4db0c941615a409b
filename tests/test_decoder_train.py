"""The visual-decoder stage (configs/decoder.py:tiny) through the training entry point's functions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import decoder
from emu2_jax import checkpointing, metrics, tasks, train
from emu2_jax.tasks import decoder as decoder_task
from tests import tb_events

STEPS = 40


def _config():
    config = decoder.get_config("tiny")
    config.global_batch_size = 4
    config.total_steps = STEPS
    return config


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


@pytest.fixture(scope="module")
def run():
    """Trains the tiny decoder for STEPS steps on one device; keeps the initial and final states."""
    config = _config()
    trainer = train.create_trainer(config, devices=jax.devices()[:1])
    data = trainer.task.create_iterator(config.global_batch_size, 0, 1)
    state = train.init_state(trainer, config)
    initial = _host(state.params)
    history = []
    for _ in range(STEPS):
        batch = train.make_global_batch(next(data), trainer.batch_sharding, 1, trainer.task.batch_layout)
        state, step_metrics = trainer.train_step(state, batch)
        history.append(_host(step_metrics))
    return config, trainer, data, state, initial, history


def test_tiny_decoder_config_builds():
    config = _config()
    task = tasks.create(config)
    assert isinstance(task, decoder_task.DecoderTask) and config.trainable == ("unet",)
    assert task.model_cfg.unet.cross_attention_dim == task.model_cfg.vision.width
    real = decoder.get_config()
    assert (real.global_batch_size, real.total_steps, real.optimizer.warmup_steps) == (2048, 8000, 2500)
    assert real.optimizer.learning_rate.to_dict() == {"unet": 1e-4} and real.optimizer.decay == "linear"
    real_cfg = decoder_task.model_config(real)
    assert (real_cfg.n_query, real_cfg.vision.width, real_cfg.vision.image_size) == (64, 1792, 448)
    assert real_cfg.unet.projection_class_embeddings_input_dim == 3328 and real_cfg.latent_shape == (128, 128, 4)


def test_denoising_loss_falls(run):
    *_, history = run
    losses = np.array([float(h["loss"]) for h in history])
    assert np.isfinite(losses).all() and not any(h["nonfinite"] for h in history)
    first, last = losses[:5].mean(), losses[-5:].mean()
    print(f"tiny decoder denoising loss: first 5 steps {first:.4f}, last 5 steps {last:.4f}")
    assert last < 0.5 * first
    np.testing.assert_allclose([float(h["denoise_loss"]) for h in history], losses, rtol=1e-6)
    assert {k for k in history[0] if k.startswith("lr/")} == {"lr/unet"}


def test_only_the_unet_trains(run):
    _, trainer, _, state, initial, _ = run
    final = _host(state.params)
    assert set(final) == {"visual", "unet", "vae"}
    for component in ("visual", "vae"):
        for got, want in zip(jax.tree.leaves(final[component]), jax.tree.leaves(initial[component])):
            assert np.array_equal(got, want), component  # frozen: bitwise
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(final["unet"]), jax.tree.leaves(initial["unet"]))]
    assert all(moved)
    assert trainer.num_trainable == sum(x.size for x in jax.tree.leaves(initial["unet"]))


def test_condition_dropout_rate():
    cond = jnp.arange(20_000 * 2 * 3, dtype=jnp.float32).reshape(20_000, 2, 3) + 1.0
    uncond = -jnp.ones((1, 2, 3))
    mixed, dropped = decoder_task.drop_condition(jax.random.key(0), cond, uncond, 0.1)
    assert abs(float(dropped.mean()) - 0.1) < 0.01
    np.testing.assert_array_equal(mixed[dropped], -1.0)
    np.testing.assert_array_equal(mixed[~dropped], cond[~dropped])


def test_condition_dropout_in_training(run):
    *_, history = run
    rate = np.mean([float(h["cond_dropped"]) for h in history])  # over STEPS * 4 samples
    assert 0.03 < rate < 0.2


def test_sampler_writes_a_png_grid_and_tensorboard_image(run, tmp_path):
    config, trainer, _, state, _, _ = run
    sample = trainer.task.create_sampler(trainer.mesh, trainer.rules, str(tmp_path))
    writer = metrics.SummaryWriter(str(tmp_path / "tb"))
    sample(7, state.params, writer)
    writer.close()
    size = config.data.decoder_image_size
    grid = np.asarray(Image.open(tmp_path / "samples" / "step_7.png"))
    # inputs above reconstructions, num_samples columns, 2-pixel gutters
    assert grid.shape == (2 * size + 2, config.num_samples * (size + 2) - 2, 3)
    reconstructions = grid[size + 2:, :size]
    assert reconstructions.std() > 0
    logged = tb_events.read_images(tb_events.event_files(tmp_path / "tb")[0])
    np.testing.assert_array_equal(logged[7]["samples/grid"], grid)


def test_checkpoint_round_trip_and_resume(run, tmp_path):
    """A saved decoder state restores bitwise, and the next step from it equals the uninterrupted one
    (noise is drawn from the seed and the step)."""
    config, trainer, data, state, _, _ = run
    manager = checkpointing.create_manager(tmp_path, save_every_steps=1, keep=1, async_save=False)
    checkpointing.save_checkpoint(manager, STEPS, state, data.get_state(), config, force=True)
    manager.wait_until_finished()
    restored, data_state = checkpointing.restore_checkpoint(manager, STEPS, trainer.abstract_state)
    manager.close()
    for got, want in zip(jax.tree.leaves(_host(restored)), jax.tree.leaves(_host(state))):
        assert np.array_equal(got, want)
    resumed_data = trainer.task.create_iterator(config.global_batch_size, 0, 1)
    resumed_data.set_state(data_state)
    local = next(data)
    np.testing.assert_array_equal(next(resumed_data)["target_images"], local["target_images"])
    batch = train.make_global_batch(local, trainer.batch_sharding, 1, trainer.task.batch_layout)
    _, restored_metrics = trainer.train_step(restored, batch)
    _, metrics = trainer.train_step(state, batch)
    np.testing.assert_array_equal(float(restored_metrics["loss"]), float(metrics["loss"]))


def test_paper_decoder_step_lowers_on_an_fsdp_mesh():
    """The paper-sized decoder step (EVA-02-E encoder at 448 px, SDXL UNet and VAE at 1024 px, bf16,
    remat) traces with its shardings; the UNet's 4-channel output falls back to replication."""
    config = decoder.get_config()
    config.update(allow_large_on_cpu=True, mesh_shape=(1, 8, 1), global_batch_size=8)
    trainer = train.create_trainer(config)
    assert 2.4e9 < trainer.num_trainable < 2.7e9 and trainer.num_params > 6.5e9
    batch = jax.tree.map(lambda s: jax.ShapeDtypeStruct((1, *s.shape), s.dtype, sharding=trainer.batch_sharding),
                         trainer.task.dummy_batch(8))
    assert "bf16" in trainer.train_step.lower(trainer.abstract_state, batch).as_text()
    assert trainer.abstract_state.params["unet"]["conv_out"]["bias"].sharding.spec == jax.sharding.PartitionSpec(None)
