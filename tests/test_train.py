"""The train step and loop on the tiny model and the embedded dataset (8 simulated CPU devices)."""
import glob
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import chat, emu1_chat, gen, stage1, stage2
from emu2_jax import metrics, train
from emu2_jax.data import pipeline, tokenizer
from emu2_jax.tasks import llm as llm_task
from tests import cli, tb_events

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LR = {"projector": 1e-3, "llm": 3e-4}


def _batches(config, trainer, count):
    it = pipeline.create_train_iterator(
        config.data, tokenizer=llm_task.load_tokenizer(config, trainer.model_cfg), seq_len=config.seq_len,
        batch_size=config.global_batch_size, image_size=trainer.model_cfg.vision.image_size,
        n_query=trainer.model_cfg.n_query, v_query=trainer.model_cfg.v_query,
        max_images_per_row=config.max_images_per_row, seed=config.seed)
    return [next(it) for _ in range(count)]


def _stage2_config():
    """Stage 2 (frozen encoder, text + image loss) with a constant, decay-free learning rate per group."""
    config = stage2.get_config("tiny")
    config.optimizer.update(warmup_steps=0, decay="constant", weight_decay=0.0)
    config.optimizer.learning_rate.update(visual=5e-3, **LR)
    return config


@pytest.fixture(scope="module")
def stage2_single():
    config = _stage2_config()
    trainer = train.create_trainer(config, devices=jax.devices()[:1])
    return config, trainer, _batches(config, trainer, 2)


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def test_sharded_accumulated_step_equals_single_device_step(stage2_single):
    config, single, batches = stage2_single
    sharded_config = _stage2_config()
    sharded_config.mesh_shape = (2, 2, 2)
    sharded_config.grad_accum_steps = 2
    sharded = train.create_trainer(sharded_config)
    assert len(sharded.mesh.devices.flat) == 8
    # The models' activation annotations become sharding constraints inside the jitted step, e.g. the
    # attention heads [micro rows, seq, heads, head_dim] split over the tensor axis.
    llm, rows = sharded.model_cfg.llm, sharded_config.global_batch_size // sharded_config.grad_accum_steps
    lowered = sharded.train_step.lower(sharded.abstract_state, jax.tree.map(
        lambda s: jax.ShapeDtypeStruct((2, rows, *s.shape[1:]), s.dtype, sharding=sharded.batch_sharding),
        sharded.task.dummy_batch(rows))).as_text()
    heads = f"tensor<{rows}x{config.seq_len}x{llm.num_heads}x{llm.head_dim}x"
    assert any("sharding_constraint" in line and '{"tensor"}' in line and heads in line
               for line in lowered.splitlines())
    one, many = train.init_state(single, config), train.init_state(sharded, sharded_config)
    np.testing.assert_array_equal(*(np.asarray(s.params["llm"]["lm_head"]["kernel"]) for s in (one, many)))
    for batch in batches:
        one, one_metrics = single.train_step(one, train.make_global_batch(batch, single.batch_sharding, 1))
        many, many_metrics = sharded.train_step(many, train.make_global_batch(batch, sharded.batch_sharding, 2))
        for key in ("loss", "text_loss", "image_loss", "grad_norm", "text_accuracy", "tokens"):
            np.testing.assert_allclose(many_metrics[key], one_metrics[key], rtol=2e-5, err_msg=key)
        assert float(one_metrics["image_loss"]) > 0 and float(one_metrics["text_loss"]) > 0
    up = many.params["llm"]["layers"]["mlp"]["up"]["kernel"]
    assert up.addressable_shards[0].data.shape == (up.shape[0], up.shape[1] // 2, up.shape[2] // 2)  # fsdp, tensor
    # Sharded activations reduce in another order; Adam's normalised update turns the float noise of
    # a rarely-used token's tiny embedding gradient into a few 1e-6 of difference.
    for got, want in zip(jax.tree.leaves(_host(many)), jax.tree.leaves(_host(one))):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_frozen_params_unchanged_and_learning_rates_per_component(stage2_single):
    config, trainer, batches = stage2_single
    state = train.init_state(trainer, config)
    before = _host(state.params)
    state, step_metrics = trainer.train_step(state, train.make_global_batch(batches[0], trainer.batch_sharding, 1))
    after = _host(state.params)
    for got, want in zip(jax.tree.leaves(after["visual"]), jax.tree.leaves(before["visual"])):
        assert np.array_equal(got, want)  # frozen: bitwise
    assert "lr/visual" not in step_metrics
    # Adam's first step moves each weight by at most (and typically exactly) its group's rate.
    for component, group in (("connector", "projector"), ("project_down", "projector"), ("llm", "llm")):
        delta = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(after[component]),
                                                              jax.tree.leaves(before[component])))
        np.testing.assert_allclose(delta, LR[group], rtol=1e-3, err_msg=component)
        np.testing.assert_allclose(step_metrics[f"lr/{group}"], LR[group], rtol=1e-6)
    assert int(state.step) == 1


def test_nonfinite_update_is_skipped(stage2_single):
    config, trainer, batches = stage2_single
    state = train.init_state(trainer, config)
    before = _host(state)
    poisoned = {**batches[1], "image_loss_mask": np.full_like(batches[1]["image_loss_mask"], np.nan)}
    state, step_metrics = trainer.train_step(state, train.make_global_batch(poisoned, trainer.batch_sharding, 1))
    assert float(step_metrics["nonfinite"]) == 1.0 and not np.isfinite(float(step_metrics["loss"]))
    after = _host(state)
    assert int(after.step) == 1
    for got, want in zip(jax.tree.leaves((after.params, after.opt_state)),
                         jax.tree.leaves((before.params, before.opt_state))):
        assert np.array_equal(got, want)


def test_lora_trains_only_the_adapters():
    config = emu1_chat.get_config("tiny")
    config.optimizer.warmup_steps = 0
    trainer = train.create_trainer(config, devices=jax.devices()[:1])
    assert trainer.model_cfg.connector == "causal_transformer" and trainer.model_cfg.llm.lora_rank == 4
    state = train.init_state(trainer, config)
    adapters = sum(x.size for p, x in jax.tree_util.tree_leaves_with_path(state.params)
                   if p[-1].key in ("lora_a", "lora_b"))
    assert trainer.num_trainable == adapters
    assert sum(x.size for x in jax.tree.leaves(state.opt_state)) == 2 * adapters + 6  # mu, nu; 6 counts
    before = _host(state.params)
    batch = _batches(config, trainer, 1)[0]
    state, _ = trainer.train_step(state, train.make_global_batch(batch, trainer.batch_sharding, 1))
    changed = {"/".join(k.key for k in p) for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(_host(state.params)),
                                                            jax.tree.leaves(before)) if not np.array_equal(a, b)}
    assert changed and all(name.endswith("lora_b") for name in changed)  # lora_a's gradient is 0 while B = 0


class _PoisonAt:
    """Wraps the data iterator: batch number `at` (1-based) gets a NaN image loss mask (uint8 pixels
    hold no NaN)."""

    def __init__(self, inner, at):
        self._inner, self._at, self._count = inner, at, 0

    def __next__(self):
        self._count += 1
        batch = next(self._inner)
        poison = {"image_loss_mask": np.full_like(batch["image_loss_mask"], np.nan)}
        return {**batch, **poison} if self._count == self._at else batch

    def get_state(self):
        return self._inner.get_state()

    def set_state(self, state):
        self._inner.set_state(state)

    def stats(self):
        return self._inner.stats()

    def close(self):
        self._inner.close()


def _poison_data(monkeypatch, at):
    real = pipeline.create_train_iterator
    monkeypatch.setattr(pipeline, "create_train_iterator", lambda *a, **k: _PoisonAt(real(*a, **k), at))


def test_tiny_run_loss_falls_and_captions_are_learned(tmp_path, monkeypatch, caplog):
    config = stage1.get_config("tiny")
    config.update(total_steps=100, log_every_steps=20, checkpoint_every_steps=40, sample_every_steps=100)
    _poison_data(monkeypatch, at=5)
    with caplog.at_level("WARNING"):
        train.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
    assert "Non-finite loss or update at step 5" in caplog.text

    (events,) = glob.glob(str(tmp_path / "events.out.tfevents.*"))
    scalars = tb_events.read_scalars(events)
    assert sorted(scalars) == [1, 20, 40, 60, 80, 100]
    assert scalars[1]["loss"] > 6.0 and scalars[100]["loss"] < 0.3, {s: v["loss"] for s, v in scalars.items()}
    assert scalars[20]["nonfinite"] == 1.0 and np.isfinite(scalars[20]["loss"])
    assert {"lr/visual", "lr/llm", "lr/projector", "grad_norm", "param_norm", "tokens_per_sec",
            "images_per_sec"} <= set(scalars[40])
    assert scalars[40]["data/skipped/bad_image"] == 0 and scalars[40]["data/ingest_skipped/bad_record"] == 0
    assert scalars[100]["data/examples"] > scalars[40]["data/examples"] > 0
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["100", "40", "80"]

    pairs = [json.loads(line) for line in (tokenizer.EMBEDDED_DIR / "pairs.jsonl").read_text().splitlines()]
    captions = {}
    for pair in pairs:
        captions.setdefault(pair["image"], set()).add(pair["caption"])
    samples = json.loads((tmp_path / "samples" / "step_100.json").read_text())["samples"]
    assert len(samples) == 4
    reproduced = [s["caption"] in captions[s["image"]] for s in samples]
    assert sum(reproduced) >= 3, samples

    # The same samples in TensorBoard: the input images (as the encoder gets them) and their captions.
    images = tb_events.read_images(events)
    size = llm_task.model_config(config).vision.image_size
    expected = llm_task.load_sample_images(config, size)[1]
    assert list(images) == [100] and list(images[100]) == [f"samples/{i}" for i in range(4)]
    for i in range(4):
        np.testing.assert_array_equal(images[100][f"samples/{i}"], expected[i])
    assert expected.shape == (4, size, size, 3) and expected.std() > 20  # real pictures, not a flat fill
    texts = tb_events.read_text(events)
    assert list(texts) == [100]
    assert texts[100] == {f"samples/{i}": f"{s['caption']}\n\nreference: {s['reference']} ({s['image']})"
                          for i, s in enumerate(samples)}


def test_nonfinite_stop_policy_keeps_checkpoints_clean(tmp_path, monkeypatch):
    config = stage1.get_config("tiny")
    config.update(total_steps=6, checkpoint_every_steps=2, log_every_steps=100, sample_every_steps=0,
                  nonfinite="stop")
    _poison_data(monkeypatch, at=3)
    with pytest.raises(FloatingPointError, match="step 3"):
        train.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
    assert os.listdir(tmp_path / "checkpoints") == ["2"]


def test_refuses_the_37b_model_on_cpu(tmp_path):
    with pytest.raises(SystemExit, match=r"configs/stage1.py:tiny"):
        train.train_and_evaluate(stage1.get_config(), str(tmp_path))


def _command(workdir):
    return [sys.executable, "-m", "emu2_jax.train", "--config=configs/stage1.py:tiny", f"--workdir={workdir}",
            "--config.total_steps=40", "--config.checkpoint_every_steps=10", "--config.log_every_steps=5",
            "--config.sample_every_steps=0"]


def test_sigkill_and_restart_gives_the_uninterrupted_result(tmp_path):
    # One CPU device (no simulated mesh) and a shared compilation cache keep the three runs quick.
    env = {**os.environ, "XLA_FLAGS": "", "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "PYTHONPATH": REPO}
    full = subprocess.run(_command(tmp_path / "full"), cwd=REPO, env=env, capture_output=True, text=True)
    assert full.returncode == 0, full.stderr[-3000:]

    killed = subprocess.Popen(_command(tmp_path / "killed"), cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in killed.stderr:
        seen.append(line)
        if "step 25/40" in line:
            killed.send_signal(signal.SIGKILL)
            break
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, "".join(seen)[-3000:]

    resumed = subprocess.run(_command(tmp_path / "killed"), cwd=REPO, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from step 20" in resumed.stderr or "Resuming from step 10" in resumed.stderr

    checkpointer = ocp.StandardCheckpointer()
    final = [checkpointer.restore(tmp_path / run / "checkpoints" / "40" / "state") for run in ("full", "killed")]
    leaves = [jax.tree.leaves(f) for f in final]
    assert len(leaves[0]) == len(leaves[1]) > 10
    for a, b in zip(*leaves):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_sigterm_writes_a_final_checkpoint(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": REPO}
    command = _command(tmp_path)
    command[command.index("--config.total_steps=40")] = "--config.total_steps=100000"
    proc = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "step 5/" in line:
            proc.send_signal(signal.SIGTERM)
    proc.wait()
    log = "".join(seen)
    assert proc.returncode == 0, log[-3000:]
    assert "Preemption notice (SIGTERM)" in log
    steps = [int(s) for s in os.listdir(tmp_path / "checkpoints")]
    assert len(steps) == 1 and 5 <= steps[0] < 100, steps


@pytest.mark.parametrize("module, arg", [
    (stage1, None), (stage1, "hires"), (stage2, None), (chat, None), (gen, None), (gen, "qft"), (emu1_chat, None),
    (stage1, "tiny"), (stage1, "hires,tiny"), (stage2, "tiny"), (chat, "tiny"), (gen, "tiny"), (gen, "qft,tiny"),
    (emu1_chat, "tiny"),
])
def test_stage_configs_build(module, arg):
    config = module.get_config(arg)
    for field in ("total_steps", "checkpoint_every_steps", "log_every_steps", "seed", "global_batch_size",
                  "mesh_shape"):
        assert field in config, field
    model_cfg = llm_task.model_config(config)
    train.optim.create_optimizer(config.optimizer, config.total_steps)
    if arg and "tiny" in arg:
        assert config.model == "tiny" and config.global_batch_size <= 8
        assert llm_task.load_tokenizer(config, model_cfg).vocab_size == model_cfg.llm.vocab_size
        assert train.create_trainer(config, devices=jax.devices()[:1]).num_params < 5_000_000
    else:
        assert model_cfg.llm.num_layers >= 40 and config.global_batch_size >= 128
        with pytest.raises(ValueError, match="tokenizer_path"):  # the embedded tokenizer is not LLaMA's
            llm_task.load_tokenizer(config, model_cfg)
    with pytest.raises(ValueError, match="unknown config variant"):
        module.get_config("huge")


def test_event_files_round_trip(tmp_path):
    writer = metrics.SummaryWriter(str(tmp_path))
    writer.scalars(3, {"loss": 2.5, "lr/llm": 1e-4})
    writer.scalars(7, {"loss": 1.25})
    rng = np.random.default_rng(0)
    image, batch = (rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((12, 10, 3), (2, 6, 8, 3)))
    writer.images(7, {"samples/0": image, "batch": batch})
    writer.text(7, {"samples/0": "a cat on a mat", "notes": "ünïcode *markdown*"})
    with pytest.raises(ValueError, match="uint8"):
        writer.images(7, {"normalised": image.astype(np.float32)})
    writer.close()

    (path,) = tb_events.event_files(tmp_path)
    assert tb_events.read_scalars(path) == {3: {"loss": 2.5, "lr/llm": np.float32(1e-4)}, 7: {"loss": 1.25}}
    images = tb_events.read_images(path)
    assert list(images) == [7] and sorted(images[7]) == ["batch", "samples/0"]
    np.testing.assert_array_equal(images[7]["samples/0"], image)  # PNG: lossless
    np.testing.assert_array_equal(images[7]["batch"], np.concatenate(list(batch), axis=1))  # a grid of one row
    assert tb_events.read_text(path) == {7: {"samples/0": "a cat on a mat", "notes": "ünïcode *markdown*"}}

    file = pathlib.Path(path)
    data = bytearray(file.read_bytes())
    data[-6] ^= 1
    file.write_bytes(data)
    with pytest.raises(ValueError, match="corrupt record"):
        tb_events.read_scalars(path)
    file.write_bytes(data[:-3])
    with pytest.raises(ValueError, match="truncated record"):
        tb_events.read_scalars(path)


def test_event_files_are_readable_while_the_writer_is_open(tmp_path):
    writer = metrics.SummaryWriter(str(tmp_path), flush_secs=0.2)
    try:
        writer.scalars(5, {"loss": 0.5})
        deadline = time.monotonic() + 30
        while not tb_events.read_scalars(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert tb_events.read_scalars(tmp_path) == {5: {"loss": 0.5}}
    finally:
        writer.close()


def test_training_flops_estimate():
    config = llm_task.model_config(stage1.get_config())
    llm = config.llm
    per_token = 2 * llm.num_layers * (4 * llm.hidden_size ** 2 + 3 * llm.hidden_size * llm.intermediate_size)
    text_only = metrics.training_flops(config, tokens=1000, seq_len=1, images=0, trainable=("llm",))
    assert text_only == pytest.approx(3 * 1000 * (per_token + 2 * llm.hidden_size * llm.vocab_size), rel=1e-3)
    frozen_encoder = metrics.training_flops(config, tokens=0, seq_len=1, images=10, trainable=("llm",))
    trained_encoder = metrics.training_flops(config, tokens=0, seq_len=1, images=10, trainable=("visual", "llm"))
    assert trained_encoder == pytest.approx(3 * frozen_encoder)
    lora = metrics.training_flops(config, tokens=1000, seq_len=1, images=0, trainable=("llm",), lora=True)
    assert lora == pytest.approx(2 / 3 * text_only)
    assert metrics.peak_flops_per_device() is None  # CPU: no MFU


@pytest.mark.parametrize("module", [stage1, stage2, chat, gen, emu1_chat])
def test_real_configs_lower_on_an_fsdp_mesh(module):
    """The paper-sized train steps (bf16, remat, frozen parts, LoRA) trace with their shardings; nothing
    is allocated or compiled."""
    config = module.get_config()
    config.update(allow_large_on_cpu=True, mesh_shape=(1, 8, 1), grad_accum_steps=1, global_batch_size=8,
                  seq_len=128, max_images_per_row=1)
    config.model_overrides.remat_policy = "full"
    trainer = train.create_trainer(config)
    batch = jax.tree.map(lambda s: jax.ShapeDtypeStruct((1, *s.shape), s.dtype, sharding=trainer.batch_sharding),
                         trainer.task.dummy_batch(8))
    lowered = trainer.train_step.lower(trainer.abstract_state, batch)
    assert trainer.num_params > 14e9
    embed = trainer.abstract_state.params["llm"]["embed_tokens"]["embedding"]
    assert embed.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert "bf16" in lowered.as_text()


def test_a_streak_of_skipped_steps_stops_the_run(tmp_path):
    # Every update is non-finite: the run must fail at the streak's limit, not train on to "Done".
    result = cli.run(cli.train_command(tmp_path, "--config.text_loss_weight=nan", "--config.total_steps=40",
                                       "--config.checkpoint_every_steps=2", "--config.max_consecutive_nonfinite=3"))
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    (message,) = cli.message_lines(result.stderr)
    assert "3 consecutive non-finite steps (1 to 3)" in message and "step 3" in message, message
    assert "(loss nan, text_loss " in message and "max_consecutive_nonfinite=3" in message, message
    assert "Done" not in result.stderr
    # Step 2 was saved inside the allowed streak (its state is the initial one); nothing after the limit.
    assert os.listdir(tmp_path / "checkpoints") == ["2"]


@pytest.mark.parametrize("overrides, expected", [
    (["--config.total_steps=0"], "--config.total_steps=0: must be an integer >= 1"),
    (["--config.log_every_steps=0"], "--config.log_every_steps=0: must be an integer >= 1"),
    (["--config.checkpoint_every_steps=0"], "--config.checkpoint_every_steps=0: must be an integer >= 1"),
    (["--config.max_consecutive_nonfinite=0"], "--config.max_consecutive_nonfinite=0: must be an integer >= 1"),
    (["--config.nonfinite=ignore"], "--config.nonfinite='ignore': must be 'skip' or 'stop'"),
    (["--config.init_from=/ckpt/emu2", "--config.init_components=visual,nosuch"],
     "--config.init_components='visual,nosuch': unknown component(s) ['nosuch'] of task 'llm'"),
    (["--config.total_stepz=5"], "--config.total_stepz: no such field in configs/stage1.py:tiny"),
    (["--config.data.nosuch=5"], "--config.data.nosuch: no such field in configs/stage1.py:tiny"),
    (["--config.data.sources.pairs.paths=/data/laion-{000..009}.tar"],
     "data.sources.pairs.paths is set but data.sources.pairs.format is 'embedded'"),
    # What bash makes of an unquoted --config.data.paths=s-{000..002}.tar:
    ([f"--config.data.paths=s-00{i}.tar" for i in range(3)], "--config.data.paths is given 3 times"),
])
def test_invalid_config_is_one_line_before_any_work(tmp_path, overrides, expected):
    result = cli.run(cli.train_command(tmp_path / "run", *overrides))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr[-3000:]
    assert not (tmp_path / "run").exists()  # before any work
    if "given 3 times" in expected:
        assert "quote" in lines[0]


def test_sigterm_during_start_up_exits_cleanly(tmp_path):
    proc = subprocess.Popen(cli.train_command(tmp_path), cwd=REPO, env=cli.ENV, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:  # main has started (the handler is in place); the model is not built yet
        seen.append(line)
        if "JAX process" in line:
            proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    log = "".join(seen)
    assert proc.returncode == 128 + signal.SIGTERM, log[-3000:]
    assert "SIGTERM during start-up: nothing to save, exiting" in log and "Traceback" not in log, log[-3000:]
