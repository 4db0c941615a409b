"""Fault injection into the tiny stage-1 training run: kills, preemptions and a corrupt checkpoint.

    python benchmarks/faults.py [--n=20] [--steps=60] [--every=10] [--seed=0] [--workdir=DIR]

1. An uninterrupted run (`python -m emu2_jax.train --config=configs/stage1.py:tiny`, `--steps`
   steps, a checkpoint every `--every`) gives the reference final state and the run's wall time T.
2. SIGKILL at `--n` random moments, uniform in (0, T) after a start: each lands on a run that
   resumes the previous one's workdir; once a run finishes before its signal, the finished
   workdir is compared and a fresh one begins. 3. The same with SIGTERM (a preemption notice).
4. Bytes flipped in the final checkpoint's largest array file: re-running must stop naming the
   checkpoint; with `--config.restore_fallback=True` it must resume from the previous one.
Every finished workdir's final checkpoint must equal the reference array by array, bit for bit.

An injection survives when the run it hit ends bit-identical (the corruption: when it is detected
and the fallback run ends bit-identical). `lost` sums, over the signals, the steps a run had
reported (`--config.log_every_steps=1`) beyond the checkpoint it left: the work redone on resume.
The last line is `faults=<survived>/<injected> lost=<steps>`.
"""
from __future__ import annotations

import argparse
import glob
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_STEP = re.compile(r"step (\d+)/")


def command(workdir: str, args: argparse.Namespace, *extra: str) -> list[str]:
    return [sys.executable, "-m", "emu2_jax.train", "--config=configs/stage1.py:tiny",
            f"--workdir={workdir}", f"--config.total_steps={args.steps}",
            f"--config.checkpoint_every_steps={args.every}", "--config.log_every_steps=1",
            "--config.sample_every_steps=0", *extra]


def environment(root: str) -> dict[str, str]:
    """One CPU device, a shared compilation cache (restarts cost start-up, not compiles) and a
    data cache of its own."""
    return {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO,
            "EMU2_JAX_DATA_CACHE": os.path.join(root, "tfds"),
            "JAX_COMPILATION_CACHE_DIR": os.path.join(root, "jax_cache"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def checkpoints(workdir: str) -> list[int]:
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def run_with_signal(cmd: list[str], env: dict[str, str], sig: int, after: float
                    ) -> tuple[bool, int, str]:
    """Runs cmd, sending `sig` `after` seconds in unless it ended before: (signalled, last step
    it reported, stderr)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        proc.wait(timeout=after)
        signalled = False
    except subprocess.TimeoutExpired:
        proc.send_signal(sig)
        signalled = True
        proc.wait()
    reader.join()
    stderr = "".join(lines)
    steps = [int(m.group(1)) for line in lines if "loss" in line and (m := _STEP.search(line))]
    if not signalled and proc.returncode != 0:
        raise RuntimeError(f"run failed (status {proc.returncode}):\n{stderr[-3000:]}")
    return signalled, max(steps, default=0), stderr


def final_state(workdir: str, step: int) -> list[np.ndarray]:
    import jax  # pylint: disable=import-outside-toplevel
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    state = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def identical(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) > 0 and all(x.dtype == y.dtype and np.array_equal(x, y, equal_nan=True)
                                        for x, y in zip(a, b))


def inject(name: str, sig: int, args: argparse.Namespace, root: str, env: dict[str, str],
           wall: float, reference: list[np.ndarray], rng: random.Random) -> tuple[int, int, int]:
    """`args.n` signals `sig` at random moments; (survived, injected, steps lost)."""
    survived = injected = lost = chain = mid_training = 0
    hits = 0  # signals that landed on the current workdir's runs
    workdir = os.path.join(root, f"{name}-0")
    while injected < args.n:
        after = rng.uniform(0, wall)
        signalled, reached, stderr = run_with_signal(command(workdir, args), env, sig, after)
        latest = max(checkpoints(workdir), default=0)
        if signalled:
            injected, hits = injected + 1, hits + 1
            lost += max(reached - latest, 0)
            mid_training += 0 < reached < args.steps
            print(f"{name} {injected}/{args.n} at {after:.1f}s: reached step {reached}, "
                  f"checkpoint {latest}", flush=True)
        if latest == args.steps or injected == args.n:
            if latest != args.steps:  # finish the chain the last signal hit
                run_with_signal(command(workdir, args), env, sig, float("inf"))
            same = identical(final_state(workdir, args.steps), reference)
            survived += hits if same else 0
            print(f"{name} workdir {chain}: {hits} signal(s), final state "
                  f"{'bit-identical' if same else 'DIFFERS'}", flush=True)
            chain, hits = chain + 1, 0
            workdir = os.path.join(root, f"{name}-{chain}")
    print(f"{name}: {mid_training} of {injected} signals landed during training (the others "
          f"during start-up or after the last step)", flush=True)
    return survived, injected, lost


def corrupt(args: argparse.Namespace, root: str, env: dict[str, str], reference_dir: str,
            reference: list[np.ndarray]) -> bool:
    """Flips bytes in the final checkpoint: detected, and the fallback run ends bit-identical."""
    workdir = os.path.join(root, "corrupt")
    shutil.copytree(reference_dir, workdir, ignore=shutil.ignore_patterns("events.out.*"))
    state_dir = os.path.join(workdir, "checkpoints", str(args.steps), "state")
    target = max(glob.glob(os.path.join(state_dir, "ocdbt.process_*", "d", "*")),
                 key=os.path.getsize)  # the tensorstore data file holding most arrays
    with open(target, "rb") as f:
        data = bytearray(f.read())
    at = len(data) // 2
    data[at:at + 4096] = bytes(b ^ 0xFF for b in data[at:at + 4096])
    with open(target, "wb") as f:
        f.write(data)
    stopped = subprocess.run(command(workdir, args), cwd=REPO, env=env, capture_output=True,
                             text=True)
    detected = stopped.returncode != 0 and f"checkpoints/{args.steps}" in stopped.stderr
    print(f"corrupt checkpoint {args.steps}: run {'stopped, naming it' if detected else 'NOT stopped'}",
          flush=True)
    fallback = subprocess.run(command(workdir, args, "--config.restore_fallback=True"), cwd=REPO,
                              env=env, capture_output=True, text=True)
    same = fallback.returncode == 0 and identical(final_state(workdir, args.steps), reference)
    print(f"fallback run: {'bit-identical' if same else 'FAILED ' + fallback.stderr[-2000:]}",
          flush=True)
    return detected and same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20, help="SIGKILLs, and as many SIGTERMs")
    parser.add_argument("--steps", type=int, default=60, help="total_steps of the run")
    parser.add_argument("--every", type=int, default=10, help="checkpoint_every_steps")
    parser.add_argument("--seed", type=int, default=0, help="seed of the signal moments")
    parser.add_argument("--workdir", default="", help="where the runs go ('' = a temp dir, removed)")
    args = parser.parse_args()
    if args.n < 1 or args.steps < 2 or not 1 <= args.every < args.steps:
        parser.error("need --n >= 1, --steps >= 2 and 1 <= --every < --steps")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # this process only reads checkpoints
    root = args.workdir or tempfile.mkdtemp(prefix="emu2_faults_")
    try:
        env = environment(root)
        reference_dir = os.path.join(root, "reference")
        run_with_signal(command(reference_dir, args), env, signal.SIGKILL, float("inf"))  # compiles
        shutil.rmtree(reference_dir)
        start = time.perf_counter()
        run_with_signal(command(reference_dir, args), env, signal.SIGKILL, float("inf"))
        wall = time.perf_counter() - start
        reference = final_state(reference_dir, args.steps)
        print(f"reference: {args.steps} steps in {wall:.1f}s", flush=True)
        rng = random.Random(args.seed)
        survived = injected = lost = 0
        for name, sig in (("sigkill", signal.SIGKILL), ("sigterm", signal.SIGTERM)):
            s, i, lo = inject(name, sig, args, root, env, wall, reference, rng)
            survived, injected, lost = survived + s, injected + i, lost + lo
        survived += corrupt(args, root, env, reference_dir, reference)
        injected += 1
        print(f"faults={survived}/{injected} lost={lost}")
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
