"""Running the project's commands as users do: a subprocess on one CPU device, from the repository root."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One CPU device (no simulated mesh): the commands start quicker; no probing for TPUs, whose plugin
# prints its complaints to stderr.
ENV = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}


def train_command(workdir, *overrides: str) -> list[str]:
    """`python -m emu2_jax.train` on the tiny stage-1 config, no samples, with `overrides` appended."""
    return [sys.executable, "-m", "emu2_jax.train", "--config=configs/stage1.py:tiny", f"--workdir={workdir}",
            "--config.sample_every_steps=0", *overrides]


def run(command: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    """Runs `command`; the timeout only guards against hangs (a run here takes seconds, but a loaded
    2-core machine has been seen to stretch one to over 300 s)."""
    return subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def message_lines(stderr: str) -> list[str]:
    """stderr without absl's log lines (`I1204 21:03:35.23 ...`): what the command said on exiting."""
    return [line for line in stderr.splitlines()
            if line.strip() and not (line[:1] in "IWEF" and line[1:5].isdigit())]


def initial_checkpoint(path, config):
    """(trainer, state): `config`'s initial training state, saved as step 1 of the workdir `path` by
    the trainer's own checkpointing: what a run writes, without the minutes of training."""
    import jax

    from emu2_jax import checkpointing, train

    trainer = train.create_trainer(config, devices=jax.devices()[:1])
    state = train.init_state(trainer, config)
    manager = checkpointing.create_manager(path, save_every_steps=1, keep=1, async_save=False)
    checkpointing.save_checkpoint(manager, 1, state, {}, config, force=True)
    manager.wait_until_finished()
    manager.close()
    return trainer, state


def write_initial_checkpoint(path, config) -> str:
    """The workdir `path` holding `config`'s initial state as its latest checkpoint (`initial_checkpoint`)."""
    initial_checkpoint(path, config)
    return str(path)
