"""Automatic plans (emu2_jax.plan): mesh, accumulation and remat chosen to divide the batch and fit,
explicit fields kept, estimates checked against XLA's memory analysis of the compiled step."""
import os
import re
import subprocess
import sys

import jax
import pytest

from configs import stage2
from emu2_jax import aot, plan
from emu2_jax import sharding as sh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def auto_config(**fields):
    config = stage2.get_config("tiny")
    config.update({"global_batch_size": 16, **fields})
    config.mesh_shape, config.grad_accum_steps = "auto", 0
    config.model_overrides.remat_policy = "auto"
    return config


def chip(hbm_gib: float) -> plan.Chip:
    return plan.Chip("test", hbm_gib=hbm_gib, peak_tflops=100, hbm_gbps=1000, ici_gbps=100, cores_per_name=1, dims=2)


def test_mesh_shape_forms():
    assert sh.resolve_mesh_shape("16,4,1", 64) == (16, 4, 1)
    assert sh.resolve_mesh_shape("(1,-1,2)", 8) == (1, 4, 2)
    assert sh.resolve_mesh_shape([2, 2, 2], 8) == (2, 2, 2)
    with pytest.raises(ValueError, match=r"mesh_shape='x,1,1': expected 'auto' or data,fsdp,tensor integers"):
        sh.resolve_mesh_shape("x,1,1", 8)
    with pytest.raises(ValueError, match=r"needs 4 devices, have 8"):
        sh.resolve_mesh_shape((2, 2, 1), 8)


def test_roomy_chip_gets_the_cheapest_plan_and_the_batch_divides():
    devices = jax.devices()
    best = plan.choose(auto_config(), devices, chip(1000), log=False)
    assert best.remat_policy in plan.AUTO_POLICIES and best.grad_accum_steps == 1  # nothing to trade for memory
    data, fsdp, tensor = best.mesh_shape
    assert data * fsdp * tensor == len(devices) and 16 % (data * fsdp * best.grad_accum_steps) == 0


def test_tight_chip_trades_accumulation_for_memory():
    devices, config = jax.devices(), auto_config()
    plans = plan.score(config, devices, chip(1000))
    roomy = min(plans, key=lambda p: (p.step_s, p.grad_accum_steps))
    # HBM that the roomy plan's memory exceeds but some plan's does not.
    budget = (roomy.memory_gib + min(p.memory_gib for p in plans)) / 2
    tight = plan.choose(config, devices, chip(budget / plan.HEADROOM), log=False)
    assert tight.memory_gib <= budget < roomy.memory_gib
    assert tight.grad_accum_steps > roomy.grad_accum_steps or tight.mesh_shape != roomy.mesh_shape
    for p in plans:  # every candidate divides the batch exactly
        assert 16 % (p.mesh_shape[0] * p.mesh_shape[1] * p.grad_accum_steps) == 0


def test_explicit_fields_win():
    devices = jax.devices()
    config = auto_config()
    config.mesh_shape = (2, 4, 1)
    plans = plan.score(config, devices, chip(1000))
    assert {p.mesh_shape for p in plans} == {(2, 4, 1)}
    config.grad_accum_steps = 2
    config.model_overrides.remat_policy = "full"
    assert plan.choose(config, devices, chip(1000), log=False) is None  # nothing left to choose
    [only] = plan.score(config, devices, chip(1000))
    assert (only.mesh_shape, only.grad_accum_steps, only.remat_policy, only.rows_per_chip) == ((2, 4, 1), 2, "full", 1)


def test_impossible_requests_are_one_line_errors():
    devices = jax.devices()
    with pytest.raises(ValueError, match=r"^no plan fits 8 x test \(0 GiB HBM, 85% usable\): the smallest, mesh"):
        plan.choose(auto_config(), devices, chip(0.001), log=False)
    with pytest.raises(ValueError, match=r"^global_batch_size=7 divides over no mesh of 8 devices"):
        plan.choose(auto_config(global_batch_size=7), devices, chip(1000), log=False)


def test_estimate_tracks_the_compiled_step_on_the_simulated_mesh():
    """On 8 simulated CPU devices: the state part of the estimate holds the compiled step's arguments
    (parameters + optimizer state) plus two float32 gradient trees; state + activations is within
    0.5-3x of XLA:CPU's arguments + temporaries (the factors are calibrated on XLA:TPU at 37B)."""
    devices = jax.devices()
    config = stage2.get_config("tiny")
    config.update(global_batch_size=16, grad_accum_steps=2, mesh_shape=(1, 8, 1))
    config.model_overrides.remat_policy = "full"
    [estimate] = plan.score(config, devices, None)
    _, compiled, _ = aot.compile_train_step(config, devices)
    memory = compiled.memory_analysis()
    arguments, temps = memory.argument_size_in_bytes / 2 ** 30, memory.temp_size_in_bytes / 2 ** 30
    assert arguments <= estimate.state_gib <= 2.2 * arguments   # + accumulated and microbatch gradients
    ratio = (estimate.state_gib + estimate.activation_gib) / (arguments + temps)
    assert 0.5 <= ratio <= 3, ratio


def test_explicit_policy_is_the_only_one_estimated():
    config = auto_config()
    config.model_overrides.remat_policy = "minimal"
    plans = plan.score(config, jax.devices(), chip(1000))
    assert {p.remat_policy for p in plans} == {"minimal"}


def test_aot_with_automatic_plan_on_a_small_topology():
    pytest.importorskip("libtpu", reason="libtpu (pip install libtpu) describes TPU topologies for compiling")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    run = subprocess.run([sys.executable, "-m", "emu2_jax.aot", "--config=configs/stage2.py:tiny", "--topology=v5e-8",
                          "--config.mesh_shape=auto", "--config.grad_accum_steps=0",
                          "--config.model_overrides.remat_policy=auto"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    chosen = re.search(r"automatic plan for 8 x v5e: mesh \(data, fsdp, tensor\) = \((\d+), (\d+), (\d+)\), "
                       r"grad_accum_steps (\d+) .* remat (\w+); estimated ([\d.]+) GiB", run.stdout)
    assert chosen, run.stdout[-2000:]
    data, fsdp, tensor, accum = (int(chosen[i]) for i in range(1, 5))
    assert data * fsdp * tensor == 8 and 8 % (data * fsdp * accum) == 0  # tiny stage2's batch is 8
    assert f"mesh data {data} x fsdp {fsdp} x tensor {tensor}" in run.stdout
    last = run.stdout.strip().splitlines()[-1]
    compiled = float(re.fullmatch(r"fits=true hbm_per_chip_gib=([\d.]+) flops_ratio=[\d.]+", last)[1])
    assert compiled <= float(chosen[6])  # the estimate (with its fixed GiB) bounds the compiled peak
