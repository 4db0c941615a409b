"""Checkpoints: resharding restore, keep-K, per-process data state, params-only init_from, SIGTERM."""
import json
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import stage1
from emu2_jax import checkpointing, optim, train
from emu2_jax import sharding as sh
from tests import cli


def _state(mesh):
    fsdp = NamedSharding(mesh, P("fsdp", None))
    params = {"visual": {"pos_embed": jnp.arange(17 * 4, dtype=jnp.float32).reshape(1, 17, 4)},
              "llm": {"w": {"kernel": jax.device_put(jnp.arange(64.0).reshape(8, 8), fsdp)}},
              "project_down": {"kernel": jnp.ones((8, 2))}}
    config = ml_collections.ConfigDict(dict(
        b1=0.9, b2=0.95, eps=1e-6, weight_decay=0.0, grad_clip_norm=1.0, learning_rate=dict(
            visual=1.0, projector=1.0, llm=1.0), warmup_steps=0, warmup_ratio=0.0, decay="constant",
        end_lr_factor=0.0))
    tx, _ = optim.create_optimizer(config, 10)
    trainable, _ = optim.split_params(params, optim.trainable_predicate(("llm", "project_down"), lora=False))
    opt_state = tx.init(trainable)
    opt_state = jax.tree.map(lambda x: x + 0.5 if x.dtype == jnp.float32 else x, opt_state)
    return {"step": jnp.array(7, jnp.int32), "params": params, "opt_state": opt_state}


def _manager(workdir, **kw):
    return checkpointing.create_manager(workdir, save_every_steps=kw.pop("every", 1), keep=kw.pop("keep", 2), **kw)


def test_restore_onto_a_different_mesh(tmp_path):
    state = _state(sh.create_mesh((1, 8, 1)))
    manager = _manager(tmp_path)
    assert checkpointing.save_checkpoint(manager, 7, state, {"epoch": 1, "position": 12},
                                         ml_collections.ConfigDict({"seed": 3, "mesh_shape": (1, -1, 1)}))
    manager.wait_until_finished()

    mesh = sh.create_mesh((2, 2, 2))
    target = jax.tree.map(lambda x: NamedSharding(mesh, P(("data", "fsdp")) if x.ndim and x.shape[0] % 4 == 0
                                                  else P()), state)
    restored_manager = _manager(tmp_path)
    assert restored_manager.latest_step() == 7
    restored, data_state = checkpointing.restore_checkpoint(
        restored_manager, 7, checkpointing.abstract_like(state, target))
    assert data_state == {"epoch": 1, "position": 12}
    for got, want, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(state), jax.tree.leaves(target)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert got.sharding == sharding
    kernel = restored["params"]["llm"]["w"]["kernel"]
    assert kernel.sharding.spec == P(("data", "fsdp")) and len(kernel.addressable_shards) == 8
    files = os.listdir(tmp_path / "checkpoints" / "7" / "data")
    assert "process_0-of-1.json" in files
    config = json.loads((tmp_path / "checkpoints" / "7" / "config" / "config.json").read_text())
    assert config == {"seed": 3, "mesh_shape": [1, -1, 1]}


def test_save_interval_and_keep_last_k(tmp_path):
    state = _state(sh.create_mesh((1, 8, 1)))
    manager = _manager(tmp_path, every=2, keep=2, async_save=False)
    config = ml_collections.ConfigDict()
    saved = [s for s in range(1, 8) if checkpointing.save_checkpoint(manager, s, state, {}, config)]
    manager.wait_until_finished()
    assert saved == [2, 4, 6]
    assert manager.all_steps() == [4, 6]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "6"]


def _abstract(params, mesh):
    return checkpointing.abstract_like(params, jax.tree.map(lambda _: NamedSharding(mesh, P()), params))


def test_load_params_selects_components_and_resizes_pos_embed(tmp_path):
    mesh = sh.create_mesh((1, 8, 1))
    params = jax.tree.map(np.asarray, _state(mesh)["params"])
    checkpointing.save_params(tmp_path / "converted", params)
    abstract = _abstract(params, mesh)
    loaded = checkpointing.load_params(str(tmp_path / "converted"), abstract, ["llm"])
    assert set(loaded) == {"llm"}
    np.testing.assert_array_equal(loaded["llm"]["w"]["kernel"], params["llm"]["w"]["kernel"])

    # A 4x4-grid position table restored into a model with an 8x8 grid: CLS kept, grid resized.
    abstract["visual"]["pos_embed"] = jax.ShapeDtypeStruct((1, 65, 4), jnp.float32,
                                                           sharding=NamedSharding(mesh, P()))
    resized = checkpointing.load_params(str(tmp_path / "converted"), abstract, ["visual"])["visual"]["pos_embed"]
    assert resized.shape == (1, 65, 4)
    np.testing.assert_array_equal(resized[0, 0], params["visual"]["pos_embed"][0, 0])
    grid = np.asarray(resized[0, 1:]).reshape(8, 8, 4)
    old = params["visual"]["pos_embed"][0, 1:].reshape(4, 4, 4)
    np.testing.assert_allclose(grid.mean(axis=(0, 1)), old.mean(axis=(0, 1)), rtol=0.02)
    assert np.all(np.diff(grid[:, 0, 0]) > 0)  # the table increased along rows; so does its resize

    abstract["project_down"]["kernel"] = jax.ShapeDtypeStruct((8, 3), jnp.float32,
                                                              sharding=NamedSharding(mesh, P()))
    with pytest.raises(ValueError, match=r"project_down/kernel has shape \(8, 2\).*expects \(8, 3\)"):
        checkpointing.load_params(str(tmp_path / "converted"), abstract, ["project_down"])
    with pytest.raises(ValueError, match=r"no component\(s\) \['connector'\]"):
        checkpointing.load_params(str(tmp_path / "converted"), {**abstract, "connector": {}}, ["connector"])


def test_load_params_from_a_training_workdir(tmp_path):
    mesh = sh.create_mesh((1, 8, 1))
    state = _state(mesh)
    manager = _manager(tmp_path, async_save=False)
    for step in (3, 5):
        state["params"]["project_down"]["kernel"] = jnp.full((8, 2), float(step))
        checkpointing.save_checkpoint(manager, step, state, {}, ml_collections.ConfigDict())
    manager.wait_until_finished()
    loaded = checkpointing.load_params(str(tmp_path), _abstract(state["params"], mesh), ["project_down"])
    np.testing.assert_array_equal(loaded["project_down"]["kernel"], np.full((8, 2), 5.0))


def test_sigterm_sets_the_preemption_flag(tmp_path):
    previous = signal.getsignal(signal.SIGTERM)
    watcher = checkpointing.PreemptionWatcher(_manager(tmp_path))
    try:
        assert not watcher.reached(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert watcher.reached(2)
    finally:
        watcher.close()
    assert signal.getsignal(signal.SIGTERM) is previous


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints of a real (tiny) run.


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    """A tiny stage-1 run's workdir with checkpoints at steps 2 and 4, as the command writes them."""
    path = tmp_path_factory.mktemp("run")
    result = cli.run(cli.train_command(path, "--config.total_steps=4", "--config.checkpoint_every_steps=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    return path


@pytest.fixture(scope="module")
def tiny_abstract_state():
    return train.create_trainer(stage1.get_config("tiny"), devices=jax.devices()[:1]).abstract_state


def _copy(workdir, tmp_path):
    shutil.copytree(workdir, tmp_path / "run")
    return tmp_path / "run"


def _data_files(workdir, step):
    """The step's array data files (tensorstore OCDBT), largest first."""
    files = (workdir / "checkpoints" / str(step) / "state").glob("ocdbt.process_*/d/*")
    return sorted(files, key=lambda f: f.stat().st_size, reverse=True)


def _restore(workdir, step, abstract_state):
    manager = _manager(workdir)
    try:
        return checkpointing.restore_checkpoint(manager, step, abstract_state)
    finally:
        manager.close()


def test_digest_sees_changed_and_moved_words_of_sharded_arrays():
    state = _state(sh.create_mesh((1, 8, 1)))
    saved = {name: [total, weighted] for name, (total, weighted, _) in checkpointing.state_digest(state).items()}
    on_host = jax.tree.map(np.array, state)  # writable copies
    assert checkpointing.state_digest(on_host) == checkpointing.state_digest(state)  # sharding does not matter
    assert checkpointing.verify_state(state, saved) == []

    kernel = on_host["params"]["llm"]["w"]["kernel"]  # arange(64): finite changes only
    kernel[3, 5] += 1.0
    now = list(checkpointing.state_digest(on_host)["params/llm/w/kernel"][:2])
    assert checkpointing.verify_state(on_host, saved) == [
        f"array params/llm/w/kernel does not match its digest (checksums {now}, saved {saved['params/llm/w/kernel']})"]
    kernel[3, 5] -= 1.0
    kernel[[0, 1]] = kernel[[1, 0]]  # the same words, moved: the plain sum cannot see it
    (problem,) = checkpointing.verify_state(on_host, saved)
    assert problem.startswith("array params/llm/w/kernel does not match its digest")
    kernel[[0, 1]] = kernel[[1, 0]]
    on_host["params"]["project_down"]["kernel"][0, 0] = np.nan
    assert checkpointing.verify_state(on_host, None) == ["array params/project_down/kernel holds NaN or Inf values"]


def test_flipped_bytes_in_a_data_file_are_detected(trained_workdir, tiny_abstract_state, tmp_path):
    workdir = _copy(trained_workdir, tmp_path)
    _restore(workdir, 4, tiny_abstract_state)  # intact
    file = _data_files(workdir, 4)[0]
    original = file.read_bytes()
    # Most such flips decompress without complaint into NaNs or finite garbage (e.g. 3e38 in Adam's nu).
    for fraction in (0.2, 0.35, 0.5, 0.65, 0.8):
        data = bytearray(original)
        at = int(len(data) * fraction)
        data[at:at + 4096] = bytes(b ^ 0xFF for b in data[at:at + 4096])
        file.write_bytes(data)
        with pytest.raises(checkpointing.CorruptCheckpointError, match=r"checkpoints/4: (array|cannot read)"
                           ) as error:
            _restore(workdir, 4, tiny_abstract_state)
        assert len(str(error.value).splitlines()) == 1
    file.write_bytes(original)
    _restore(workdir, 4, tiny_abstract_state)


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_truncated_or_missing_data_file_is_one_clear_error(trained_workdir, tiny_abstract_state, tmp_path, damage):
    workdir = _copy(trained_workdir, tmp_path)
    file = _data_files(workdir, 4)[0]
    if damage == "truncate":
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    else:
        file.unlink()
    with pytest.raises(checkpointing.CorruptCheckpointError, match=r"checkpoints/4: cannot read it: .*Error reading"
                       ) as error:
        _restore(workdir, 4, tiny_abstract_state)
    assert len(str(error.value).splitlines()) == 1


def test_a_corrupt_latest_checkpoint_stops_the_run_or_falls_back(trained_workdir, tmp_path):
    workdir = _copy(trained_workdir, tmp_path)
    file = _data_files(workdir, 4)[0]
    original = file.read_bytes()
    file.unlink()
    command = cli.train_command(workdir, "--config.total_steps=5", "--config.checkpoint_every_steps=2")

    stopped = cli.run(command)
    assert stopped.returncode != 0
    assert "Traceback" not in stopped.stderr and "Event loop is closed" not in stopped.stderr, stopped.stderr[-3000:]
    (message,) = cli.message_lines(stopped.stderr)
    assert "checkpoints/4: cannot read it" in message and "--config.restore_fallback=True" in message, message

    file.write_bytes(original[: len(original) // 2])
    resumed = cli.run([*command, "--config.restore_fallback=True"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from step 2" in resumed.stderr
    errors = [line for line in resumed.stderr.splitlines() if line.startswith("E")]
    assert len(errors) == 1 and "checkpoints/4: cannot read it" in errors[0], resumed.stderr[-3000:]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4", "5"]
    (set_aside,) = os.listdir(workdir / "corrupt_checkpoints")
    assert set_aside.startswith("4")


def test_load_pretrained_from_a_training_workdir(trained_workdir):
    """The run's model config (from its saved run config) and its latest step's params, in one call."""
    model_config, params = checkpointing.load_pretrained(str(trained_workdir))
    assert list(model_config) == ["emu2"] and model_config["emu2"].llm.num_layers == 2
    assert sorted(params) == ["connector", "llm", "project_down", "visual"]
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), params)
    again = checkpointing.load_params(str(trained_workdir / "checkpoints"), abstract, sorted(params))
    jax.tree.map(np.testing.assert_array_equal, params, again)
    assert params["llm"]["layers"]["attn"]["q"]["kernel"].shape == (2, 128, 4, 32)
