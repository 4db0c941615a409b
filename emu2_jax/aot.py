r"""Compiles a stage's full-size train step for a TPU pod slice from any machine (no TPU needed).

    python -m emu2_jax.aot --config=configs/stage2.py --topology=v5p-256
    python -m emu2_jax.aot --config=configs/stage2.py --topology=v5p-256 --mode=infer   # prefill + 1 step

libtpu (pip install libtpu) describes the slice's chips; the step is lowered with abstract
parameters, optimizer state and batch (shapes and shardings only: nothing is allocated) and
compiled by XLA:TPU. Printed: per-chip memory (arguments, temporaries, outputs vs HBM), FLOPs per
step from XLA next to the analytic count, a roofline step time and MFU, and a last line
`fits=<true|false> hbm_per_chip_gib=<x> flops_ratio=<y>`.

FLOPs conventions. XLA's cost analysis of an SPMD program is per device (multiplied by the chip count
here) and counts the body of a while loop once, whatever its trip count: with the layers scanned and
gradients accumulated in a scan it undercounts many times over, so it is printed for reference only.
The program FLOPs used for the ratio count every dot_general / convolution of the traced step's
jaxpr, scans times their length, remat recomputation included (`metrics.jaxpr_flops`). The analytic count is
the task's `training_flops`, the same number the training loop's MFU uses (MaxText's definition):
    passes x (2 x matmul params x tokens + 4 x layers x heads x head_dim x tokens x seq_len / 2)
for the LLM (causal attention counted at half) plus the encoder's forward (x3 when it trains) over
every image slot; passes = 3 for trained weights (forward + 2 backward), 2 for frozen weights that
gradients flow through, 1 forward only. flops_ratio = program / analytic: the recomputation (remat)
and non-matmul overhead. The roofline takes the slower of compute at the chip's peak bf16 FLOPs and
HBM traffic at its bandwidth, ignoring collectives. Collective bytes come from the compiled HLO
(`emu2_jax.hlo`: every collective times the trip counts of the loops around it), timed at the chip's
ICI bandwidth.
"""
from __future__ import annotations

import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from jax.sharding import NamedSharding, PartitionSpec

from emu2_jax import cli, hlo, metrics, train
from emu2_jax import plan as plan_lib
from emu2_jax import sharding as sh
from emu2_jax.data import layout
from emu2_jax.inference import text
from emu2_jax.plan import CHIPS, Chip
from emu2_jax.tasks import llm as llm_task

GIB = 2 ** 30


ALIASES = {"v5litepod": "v5e"}
# Chip count -> the slice shape Cloud TPU provisions for it.
SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
             512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


def parse_topology(name: str) -> tuple[Chip, str]:
    """'v5p-256' (Cloud accelerator type) or 'v5p:4x4x8' (libtpu) -> (chip, libtpu topology name)."""
    match = re.fullmatch(r"(v\d+[a-z]*)([-:])([\dx]+)", name.strip().lower())
    if not match:
        raise ValueError(f"topology {name!r}: expected e.g. v5p-256, v4-128, v5e-256 or v5p:4x4x8")
    generation, sep, size = match.groups()
    chip = CHIPS.get(ALIASES.get(generation, generation))
    if chip is None:
        raise ValueError(f"topology {name!r}: unknown TPU generation {generation!r}; known: {sorted(CHIPS)}")
    if sep == ":":
        return chip, f"{chip.platform}:{size}"
    chips, rest = divmod(int(size), chip.cores_per_name)
    shapes = SHAPES_3D if chip.dims == 3 else SHAPES_2D
    if rest or chips not in shapes:
        raise ValueError(f"topology {name!r}: no {chip.platform} slice of {size}; known sizes: "
                         f"{sorted(c * chip.cores_per_name for c in shapes)}")
    return chip, f"{chip.platform}:{shapes[chips]}"


def topology_devices(name: str) -> tuple[Chip, list[jax.Device]]:
    """The chips of a TPU slice, described by libtpu without any TPU attached."""
    # Compiling only: no multi-process lock on libtpu (another compile may run beside this one).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
    chip, libtpu_name = parse_topology(name)
    # A v4 chip's two TensorCores run as one device (megacore), as JAX uses them; libtpu's default
    # description would list each core as a device with the whole chip's HBM.
    megacore = {"chip_config_name": "megacore"} if chip.platform == "v4" else {}
    return chip, list(topologies.get_topology_desc(platform="tpu", topology_name=libtpu_name, **megacore).devices)


def _cost(compiled) -> dict[str, float]:
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}


def report(compiled, chip: Chip, chips: int, program_flops: float, analytic_flops: float | None
           ) -> dict[str, float]:
    """Per-chip memory and FLOPs of a compiled program; see the module docstring for the conventions."""
    mem = compiled.memory_analysis()
    args, out, alias = mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.alias_size_in_bytes
    temp, code = mem.temp_size_in_bytes, mem.generated_code_size_in_bytes
    total = args + out - alias + temp + code  # donated state: outputs reuse their arguments' buffers
    cost = _cost(compiled)
    flops_device, bytes_device = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    # Bytes share XLA's while-loop undercount: the memory term is a lower bound.
    step_s = max(program_flops / chips / (chip.peak_tflops * 1e12), bytes_device / (chip.hbm_gbps * 1e9))
    out_ = {"arguments_gib": args / GIB, "outputs_gib": out / GIB, "aliased_gib": alias / GIB,
            "temporaries_gib": temp / GIB, "code_gib": code / GIB, "hbm_per_chip_gib": total / GIB,
            "hbm_capacity_gib": chip.hbm_gib, "fits": total / GIB <= chip.hbm_gib,
            "xla_flops_per_chip": flops_device, "xla_flops_total": flops_device * chips,
            "xla_bytes_per_chip": bytes_device, "program_flops_total": program_flops, "roofline_step_s": step_s}
    traffic = hlo.collective_traffic(compiled.as_text())
    out_.update(collective_bytes_per_chip=traffic.bytes_per_chip, collective_by_kind=traffic.by_kind,
                collective_s=traffic.bytes_per_chip / (chip.ici_gbps * 1e9),
                unknown_trip_counts=traffic.unknown_trip_counts)
    if analytic_flops:
        out_["analytic_flops_total"] = analytic_flops
        out_["flops_ratio"] = program_flops / analytic_flops
        out_["roofline_mfu"] = metrics.mfu(analytic_flops, step_s, chip.peak_tflops * 1e12, chips)
        out_["mfu_no_overlap"] = metrics.mfu(analytic_flops, step_s + out_["collective_s"], chip.peak_tflops * 1e12,
                                             chips)
    return out_


def format_report(title: str, r: dict[str, Any], chip: Chip, chips: int) -> str:
    lines = [
        title,
        f"memory per chip: arguments {r['arguments_gib']:.2f} GiB, temporaries {r['temporaries_gib']:.2f} GiB, "
        f"outputs {r['outputs_gib']:.2f} GiB (aliased with arguments {r['aliased_gib']:.2f} GiB), code "
        f"{r['code_gib']:.3f} GiB -> total {r['hbm_per_chip_gib']:.2f} of {chip.hbm_gib:.0f} GiB HBM",
        f"FLOPs per step: XLA cost analysis {r['xla_flops_per_chip']:.4g} per chip x {chips} chips = "
        f"{r['xla_flops_total']:.4g} (loop bodies counted once); program (jaxpr, scans x length, remat "
        f"included) {r['program_flops_total']:.4g} total, {r['program_flops_total'] / chips:.4g} per chip",
    ]
    if "analytic_flops_total" in r:
        lines.append(f"FLOPs per step: analytic {r['analytic_flops_total']:.4g} (passes x 2 x params x tokens + "
                     f"attention, causal at half); program / analytic = {r['flops_ratio']:.3f}")
    lines.append(f"roofline at {chip.peak_tflops:.0f} TFLOP/s and {chip.hbm_gbps:.0f} GB/s per chip (no "
                 f"collectives): step {r['roofline_step_s']:.3f} s"
                 + (f", MFU {r['roofline_mfu']:.1%}" if "roofline_mfu" in r else ""))
    kinds = ", ".join(f"{k} {v / 1e9:.3g}" for k, v in sorted(r["collective_by_kind"].items(), key=lambda kv: -kv[1]))
    lines.append(f"collectives in the compiled HLO (loops x trip counts, ring algorithm): "
                 f"{r['collective_bytes_per_chip'] / 1e9:.3g} GB per chip per step ({kinds or 'none'}) = "
                 f"{r['collective_s']:.2f} s at {chip.ici_gbps:.0f} GB/s ICI"
                 + (f"; {r['unknown_trip_counts']} loop(s) of unknown trip count counted once"
                    if r["unknown_trip_counts"] else "")
                 + (f"; MFU if none of it overlapped compute {r['mfu_no_overlap']:.1%}"
                    if "mfu_no_overlap" in r else ""))
    if "exposed_s" in r:
        lines.append(f"communication (emu2_jax.plan's model, not measured): {r['communication_s']:.2f} s per step "
                     f"at {chip.ici_gbps:.0f} GB/s ICI, {r['exposed_s']:.2f} s of it not overlapped with compute "
                     f"(the first layer's gather of each microbatch, the closing all-reduce): MFU with communication "
                     f"{r['mfu_with_communication']:.1%}")
    lines.append(f"fits={str(r['fits']).lower()} hbm_per_chip_gib={r['hbm_per_chip_gib']:.2f} "
                 f"flops_ratio={r.get('flops_ratio', float('nan')):.3f}")
    return "\n".join(lines)


def compile_train_step(config: ml_collections.ConfigDict, devices: list[jax.Device]):
    """(trainer, compiled step, program FLOPs) of `config` on `devices`, from abstract state and batch."""
    config = ml_collections.ConfigDict(config.to_dict())  # unlocked copy
    config.allow_large_on_cpu = True  # nothing is allocated here
    trainer = train.create_trainer(config, devices)
    accum = config.grad_accum_steps
    batch = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct((accum, s.shape[0] // accum, *s.shape[1:]), s.dtype,
                                       sharding=trainer.batch_sharding),
        trainer.task.dummy_batch(config.global_batch_size))
    traced = trainer.train_step.trace(trainer.abstract_state, batch)
    return trainer, traced.lower().compile(), metrics.jaxpr_flops(traced.jaxpr.jaxpr)


def compile_inference(config: ml_collections.ConfigDict, devices: list[jax.Device], *, batch_size: int,
                      prompt_len: int):
    """(trainer, (compiled prefill, its FLOPs), (compiled decode step, its FLOPs)) of the KV-cached LLM
    with weights in the compute dtype: `emu2_jax.inference.text`'s own prefill and token step.

    Prefill: images through the encoder, then the whole prompt into the cache; decode: one token.
    """
    config = ml_collections.ConfigDict(config.to_dict())
    config.allow_large_on_cpu = True
    config.model_overrides.param_dtype = config.model_overrides.dtype  # serving weights in compute dtype
    config.global_batch_size = max(batch_size, 1)
    trainer = train.create_trainer(config, devices)
    model, mesh = trainer.model, trainer.mesh
    params = jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                          trainer.abstract_state.params, trainer.param_shardings)
    # The serving layout (llama.unstack_layers, as checkpoints.load_llm gives): one array per layer,
    # sharded as its slice of the stack.
    per_layer = lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype, sharding=NamedSharding(
        mesh, PartitionSpec(*tuple(s.sharding.spec)[1:])))
    stack = jax.tree.map(per_layer, params["llm"]["layers"])
    params["llm"] = {**params["llm"], "layers": {str(i): stack for i in range(model.config.llm.num_layers)}}
    rows = sh.batch_sharding(mesh, trainer.rules, leading_accum=False)
    cache_shapes = jax.eval_shape(lambda: text.init_cache(model, batch_size))
    # Cache arrays are [B, ...]: rows over the batch axes (keys / values also over kv heads, as
    # llama.CACHE_AXES in the attention say); the write index replicated.
    cache = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rows if s.ndim else
                                                        NamedSharding(mesh, PartitionSpec())), cache_shapes)
    sizes = {**llm_task.batch_sizes(config, trainer.model_cfg), "seq_len": prompt_len}
    prompt = {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rows)
              for k, s in layout.abstract(layout.PROMPT, rows=batch_size, **sizes).items()}

    # The serving code itself (emu2_jax.inference.text): prefill of the prompt, then one cached token.
    prefill = lambda params, cache, prompt: text.prefill(model, params, cache, prompt)
    decode = lambda params, state, token: text.feed_tokens(model, params, state, token)
    state = jax.eval_shape(prefill, params, cache, prompt)
    vectors = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rows),
                           state.replace(cache=None))
    state = vectors.replace(cache=cache)
    state_out = jax.tree.map(lambda s: s.sharding, state)
    token = jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=rows)
    out = []
    for fn, args, donate in ((prefill, (params, cache, prompt), 1), (decode, (params, state, token), 1)):
        traced = jax.jit(sh.with_logical_rules(fn, mesh, trainer.rules), out_shardings=state_out,
                         donate_argnums=(donate,)).trace(*args)
        out.append((traced.lower().compile(), metrics.jaxpr_flops(traced.jaxpr.jaxpr)))
    return trainer, out[0], out[1]


def inference_flops(model_cfg, *, tokens: int, context: float, images: int) -> float:
    """Forward FLOPs: metrics.training_flops with nothing trained (one pass); `context`: mean keys attended."""
    return metrics.training_flops(model_cfg, tokens=tokens, seq_len=context, images=images, trainable=())


# ---------------------------------------------------------------------------------------------
# Entry point.

# --config (and train's other flags) come with importing emu2_jax.train.
_TOPOLOGY = flags.DEFINE_string("topology", "v5p-256", "TPU slice: Cloud name (v5p-256, v4-128, v5e-256) or "
                                "libtpu's (v5p:4x4x8).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "infer"], "train: one optimizer step of the config; "
                          "infer: KV-cached prefill of a prompt + one decode step.")
_INFER_BATCH = flags.DEFINE_integer("infer_batch", 0, "infer: rows (0: the mesh's batch shards).")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 0, "infer: prompt length (0: the config's seq_len).")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    chip, devices = topology_devices(_TOPOLOGY.value)
    chips = len(devices)
    config, plan = plan_lib.apply(flags.FLAGS.config, devices, chip)
    if plan is not None:
        print(f"automatic plan for {chips} x {chip.platform}: {plan.describe()}", flush=True)
    mesh_txt = lambda t: " x ".join(f"{k} {v}" for k, v in t.mesh.shape.items())
    if _MODE.value == "train":
        trainer, compiled, program = compile_train_step(config, devices)
        analytic = trainer.task.training_flops(trainer.abstract_state.params)
        title = (f"{config.stage} train step on {_TOPOLOGY.value} ({chips} x {devices[0].device_kind}); mesh "
                 f"{mesh_txt(trainer)}; model {config.model} {trainer.num_params / 1e9:.2f}B params "
                 f"({trainer.num_trainable / 1e9:.2f}B trainable), remat {config.model_overrides.remat_policy}; "
                 f"batch {config.global_batch_size} rows" + (f" x {config.seq_len} tokens" if "tokens" in
                 layout.keys(trainer.task.batch_layout) else "") + f" in {config.grad_accum_steps} microbatches")
        result = report(compiled, chip, chips, program, analytic)
        if hasattr(trainer.model_cfg, "llm"):  # emu2_jax.plan's communication model (LLM stages)
            [model] = plan_lib.score(config, devices, chip)
            result.update(communication_s=model.communication_s, exposed_s=model.exposed_s,
                          mfu_with_communication=metrics.mfu(analytic, result["roofline_step_s"] + model.exposed_s,
                                                             chip.peak_tflops * 1e12, chips))
        print(format_report(title, result, chip, chips), flush=True)
        return
    batch_size = _INFER_BATCH.value or sh.batch_shards(sh.create_mesh(config.mesh_shape, devices),
                                                       sh.rules_with_overrides(config.sharding_rules))
    prompt_len = _PROMPT_LEN.value or config.seq_len
    trainer, prefill, decode = compile_inference(config, devices, batch_size=batch_size, prompt_len=prompt_len)
    slots = max(config.max_images_per_row, 1)
    for name, (compiled, program), flops in (
            ("prefill", prefill, inference_flops(trainer.model_cfg, tokens=batch_size * prompt_len,
                                                 context=prompt_len / 2, images=batch_size * slots)),
            ("decode step", decode, inference_flops(trainer.model_cfg, tokens=batch_size, context=prompt_len,
                                                    images=0))):
        title = (f"{config.stage} inference {name} on {_TOPOLOGY.value} ({chips} x {devices[0].device_kind}); "
                 f"mesh {mesh_txt(trainer)}; batch {batch_size}, prompt {prompt_len} tokens, bf16 weights")
        print(format_report(title, report(compiled, chip, chips, program, flops), chip, chips), flush=True)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=cli.parse_flags)
