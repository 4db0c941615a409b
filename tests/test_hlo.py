"""Collective traffic read from compiled HLO (emu2_jax.hlo): known collectives inside loops of known
trip counts, compiled for the simulated 8-device CPU mesh, and the replica-group forms XLA prints."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from emu2_jax import hlo


@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < 8:
        pytest.skip("needs the 8 simulated CPU devices (tests/conftest.py)")
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))


def test_collectives_inside_loops_count_once_per_trip(mesh):
    @functools.partial(jax.shard_map, mesh=mesh, in_specs=P("fsdp"), out_specs=P("fsdp"))
    def step(x):  # x: [16, 128] f32 per chip
        def layer(_, acc):
            gathered = jax.lax.all_gather(acc, "fsdp", tiled=True)           # [64, 128]: 3 x 32 KiB x 3/4
            return acc + jax.lax.psum(gathered, "data")[:16] * 1e-3        # 3 x 2 x 32 KiB x 1/2
        return jax.lax.fori_loop(0, 3, layer, x)

    x = jnp.zeros((64, 128), jnp.float32)
    traffic = hlo.collective_traffic(jax.jit(step).lower(x).compile().as_text())
    gathered = 64 * 128 * 4
    assert traffic.unknown_trip_counts == 0
    assert traffic.by_kind["all-gather"] == pytest.approx(3 * gathered * 3 / 4)
    assert traffic.by_kind["all-reduce"] == pytest.approx(3 * 2 * gathered * 1 / 2)
    assert traffic.bytes_per_chip == pytest.approx(sum(traffic.by_kind.values()))


def test_replica_group_forms_async_starts_and_fused_loop_conditions():
    text = """HloModule m

%body (p: (s32[], bf16[8,256])) -> (s32[], bf16[8,256]) {
  %p = (s32[], bf16[8,256]) parameter(0)
  %a = bf16[8,256]{1,0:T(8,128)(2,1)} get-tuple-element(%p), index=1
  %ag = (bf16[2,256]{1,0}, bf16[8,256]{1,0}) all-gather-start(%a), replica_groups=[2,4]<=[8], dimensions={0}
  %rs = bf16[2,256]{1,0} reduce-scatter(%a), replica_groups=mesh['x'=2,'y'=4] {'y'}, dimensions={0}
  %ar = (f32[100]{0}, f32[28]{0}) all-reduce(%x, %y), replica_groups={{0,1},{2,3},{4,5},{6,7}}, to_apply=%add
  %cp = f32[10]{0} collective-permute(%z), source_target_pairs={{0,1},{1,0}}
  ROOT %t = (s32[], bf16[8,256]) tuple(%i, %a)
}

%fused_lt (i: s32[]) -> pred[] {
  %limit = s32[]{:T(128)} constant(5)
  ROOT %lt = pred[] compare(%i, %limit), direction=LT
}

%cond (p: (s32[], bf16[8,256])) -> pred[] {
  %p = (s32[], bf16[8,256]) parameter(0)
  ROOT %f = pred[] fusion(%i), kind=kLoop, calls=%fused_lt
}

ENTRY %main (x: bf16[8,256]) -> bf16[8,256] {
  %w = (s32[], bf16[8,256]) while(%t0), condition=%cond, body=%body
  %g = f32[4096]{0} all-to-all(%q), replica_groups=[1,8]<=[8], dimensions={0}
  ROOT %r = bf16[8,256] get-tuple-element(%w), index=1
}
"""
    traffic = hlo.collective_traffic(text)
    slab = 8 * 256 * 2
    assert traffic.ops == 5 and traffic.unknown_trip_counts == 0
    assert traffic.by_kind == pytest.approx({
        "all-gather": 5 * slab * 3 / 4,               # the async start's largest array, group of 4
        "reduce-scatter": 5 * (slab / 4) * 3,          # result x (n - 1), group 'y' = 4
        "all-reduce": 5 * 2 * 128 * 4 * 1 / 2,         # both operands, groups of 2
        "collective-permute": 5 * 40,
        "all-to-all": 4096 * 4 * 7 / 8})
