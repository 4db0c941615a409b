"""AOT compilation for a TPU slice from this (TPU-less) machine: the tiny stage on v5p 2x2x1."""
import importlib
import os
import re
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import pytest

from configs import stage2
from emu2_jax import aot, metrics, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_topology_names():
    assert aot.parse_topology("v5p-256") == (aot.CHIPS["v5p"], "v5p:4x4x8")   # 256 TensorCores = 128 chips
    assert aot.parse_topology("v4-128") == (aot.CHIPS["v4"], "v4:4x4x4")
    assert aot.parse_topology("v5litepod-256") == (aot.CHIPS["v5e"], "v5e:16x16")
    assert aot.parse_topology("v5p:2x2x1")[1] == "v5p:2x2x1"
    with pytest.raises(ValueError, match="no v5p slice of 100"):
        aot.parse_topology("v5p-100")


def test_tiny_stage_compiles_for_v5p_and_reports_sane_numbers():
    pytest.importorskip("libtpu", reason="libtpu (pip install libtpu) describes TPU topologies for compiling")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    run = subprocess.run([sys.executable, "-m", "emu2_jax.aot", "--config=configs/stage2.py:tiny",
                          "--topology=v5p:2x2x1", "--config.model_overrides.remat_policy=full"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "mesh data 4 x fsdp 1 x tensor 1" in out and "remat full" in out
    last = out.strip().splitlines()[-1]
    match = re.fullmatch(r"fits=(true|false) hbm_per_chip_gib=([\d.]+) flops_ratio=([\d.]+)", last)
    assert match, last
    assert match[1] == "true"
    assert 0 < float(match[2]) < 1  # a tiny model: well under a GiB per chip
    # Full remat recomputes each layer's forward once: ~4/3 of the analytic 3 passes, plus small extras.
    assert 1.2 < float(match[3]) < 1.6, last
    xla = float(re.search(r"XLA cost analysis ([\d.e+]+) per chip", out)[1])
    program = float(re.search(r"program \(jaxpr.*?\) ([\d.e+]+) total", out)[1])
    assert 0 < xla * 4 < program  # XLA counts the scanned layers' body once
    mfu = float(re.search(r"MFU ([\d.]+)%", out)[1])
    assert 0 < mfu <= 100
    # Pure data parallelism: the gradients' all-reduce is the traffic, in every loop trip counted.
    comm = re.search(r"collectives in the compiled HLO .*?: ([\d.e+-]+) GB per chip per step \((.*?)\) = ([\d.]+) s",
                     out)
    assert comm and float(comm[1]) > 0 and comm[2].startswith("all-reduce"), out[-2000:]
    assert "unknown trip count" not in out
    assert 0 < float(re.search(r"MFU if none of it overlapped compute ([\d.]+)%", out)[1]) <= mfu


def test_serving_prefill_and_decode_compile_for_v5p():
    """--mode=infer compiles emu2_jax.inference.text's own prefill and token step, sharded."""
    pytest.importorskip("libtpu", reason="libtpu (pip install libtpu) describes TPU topologies for compiling")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    run = subprocess.run([sys.executable, "-m", "emu2_jax.aot", "--config=configs/stage2.py:tiny", "--mode=infer",
                          "--topology=v5p:2x2x1", "--prompt_len=96"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "inference prefill" in run.stdout and "inference decode step" in run.stdout
    assert "batch 4, prompt 96 tokens" in run.stdout
    assert run.stdout.count("fits=true") == 2, run.stdout[-2000:]


def test_jaxpr_flops_counts_scans_and_remat():
    def layer(x, w):
        return jnp.tanh(x @ w), None

    def loss(ws, x):  # 3 scanned [4, 8] @ [8, 8] matmuls, then a [4, 8] @ [8, 2] head
        x, _ = jax.lax.scan(jax.checkpoint(layer), x, ws)
        return (x @ jnp.ones((8, 2))).sum()

    ws, x = jnp.zeros((3, 8, 8)), jnp.zeros((4, 8))
    forward = 3 * 2 * 4 * 8 * 8 + 2 * 4 * 8 * 2
    assert metrics.jaxpr_flops(jax.make_jaxpr(loss)(ws, x).jaxpr) == forward
    # Gradient w.r.t. the weights: forward, remat's second forward of the layers, and two matmuls per
    # layer backward (input and weight gradients); the head's weight is a constant: one backward matmul.
    grad = forward + 3 * 2 * 4 * 8 * 8 + 3 * 2 * (2 * 4 * 8 * 8) + 2 * 4 * 8 * 2
    assert metrics.jaxpr_flops(jax.make_jaxpr(jax.grad(loss))(ws, x).jaxpr) == grad


@pytest.mark.parametrize("stage", ["decoder", "video_decoder"])
def test_decoder_analytic_flops_count_every_block(stage):
    """The decoders' analytic FLOPs (no remat) against the traced train step (remat full): the step is
    the forward plus a backward of about twice the UNet's forward plus its remat, so the ratio is
    above 1 and below 2 (XLA's cost analysis, counting each scanned stack once, fell below 1)."""
    config = importlib.import_module(f"configs.{stage}").get_config("tiny")
    config.model_overrides.remat_policy = "full"
    trainer = train.create_trainer(config, devices=jax.devices()[:1])
    batch = jax.tree.map(lambda s: jax.ShapeDtypeStruct((1, *s.shape), s.dtype, sharding=trainer.batch_sharding),
                         trainer.task.dummy_batch(config.global_batch_size))
    program = metrics.jaxpr_flops(trainer.train_step.trace(trainer.abstract_state, batch).jaxpr.jaxpr)
    analytic = trainer.task.training_flops(trainer.abstract_state.params)
    assert 1.0 < program / analytic < 1.6, (program, analytic)


def test_training_mfu_and_aot_mfu_agree(monkeypatch):
    """One FLOPs convention (causal attention at half) and one MFU formula for the training loop's
    progress line and aot's roofline: the same step time gives the same MFU."""
    config = stage2.get_config("tiny")
    trainer = train.create_trainer(config, devices=jax.devices()[:1])
    flops = trainer.task.training_flops(trainer.abstract_state.params)
    rows, seq = config.global_batch_size, config.seq_len
    counted = dict(tokens=rows * seq, images=rows * config.max_images_per_row, trainable=tuple(config.trainable))
    assert flops == metrics.training_flops(trainer.model_cfg, seq_len=seq / 2, **counted)
    llm = trainer.model_cfg.llm  # the attention term at half: 3 passes x 4 x layers x (S/2) x heads x head_dim
    full = metrics.training_flops(trainer.model_cfg, seq_len=seq, **counted)
    assert full - flops == pytest.approx(3 * 4 * llm.num_layers * seq / 2 * llm.num_heads * llm.head_dim * rows * seq)

    step_s, peak, chips = 0.5, 1e12, jax.device_count()
    clock = iter([100.0, 100.0 + 4 * step_s])  # the meter's start, then a report 4 steps later
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    training_mfu = metrics.Throughput(0, 10, flops, peak).report(4, tokens=0.0, images=0.0)["mfu"]

    chip = aot.Chip("test", hbm_gib=16, peak_tflops=peak / 1e12, hbm_gbps=1000, ici_gbps=100, cores_per_name=1, dims=2)
    memory = types.SimpleNamespace(argument_size_in_bytes=0, output_size_in_bytes=0, alias_size_in_bytes=0,
                                   temp_size_in_bytes=0, generated_code_size_in_bytes=0)
    compiled = types.SimpleNamespace(memory_analysis=lambda: memory, cost_analysis=lambda: {}, as_text=lambda: "")
    # A program whose compute at peak takes step_s: the roofline step time.
    aot_report = aot.report(compiled, chip, chips, program_flops=step_s * peak * chips, analytic_flops=flops)
    assert aot_report["roofline_step_s"] == step_s
    assert training_mfu == pytest.approx(aot_report["roofline_mfu"], rel=1e-12)
    assert training_mfu == pytest.approx(flops / (step_s * peak * chips))
