"""Every parameter of the paper-sized models divides evenly on the meshes the stages run on.

Abstract only (eval_shape): the logical specs go through sharding.LOGICAL_RULES and each sharded
dimension must divide by the product of its mesh axes' sizes (jit refuses uneven argument shardings).
"""
import jax
import numpy as np
import pytest
from flax import linen as nn

from configs import stage1
from emu2_jax import sharding as sh
from emu2_jax import train
from emu2_jax.data import layout
from emu2_jax.models import emu2, presets

# (data, fsdp, tensor) meshes per preset: v5p-256 = 128 chips, v5p-512 / v5e-256 = 256 chips.
MESHES = {
    "emu2_37b": [(1, 32, 4), (1, 64, 4), (1, 64, 2), (1, 128, 1), (1, 256, 1), (2, 16, 4), (1, 8, 1)],
    # vocab 32274 = 2 x 16137 (two chat tokens on top of 32272): tensor parallelism of at most 2.
    "emu2_chat_37b": [(1, 64, 2), (1, 128, 1), (1, 256, 1), (2, 32, 2), (1, 8, 1)],
    "emu1_14b": [(1, 32, 4), (1, 64, 4), (1, 128, 1), (1, 8, 1)],
    "emu1_release": [(1, 32, 4), (1, 64, 4), (1, 128, 1), (1, 8, 1)],
    # vocab 32006 = 2 x 16003 (Emu-I's [USER], [ASSISTANT]): tensor parallelism of at most 2.
    "emu1_instruct_release": [(1, 64, 2), (1, 128, 1), (1, 8, 1)],
}


def _mesh_specs(name):
    config = presets.get_config(name)
    batch = layout.abstract(layout.LLM, rows=1, seq_len=16, slots=1, image_size=config.vision.image_size)
    abstract = jax.eval_shape(emu2.Emu2Model(config).init, jax.random.key(0), batch)
    specs = nn.logical_to_mesh(nn.get_partition_spec(abstract), sh.LOGICAL_RULES)["params"]
    shapes = nn.unbox(abstract)["params"]
    return jax.tree_util.tree_leaves_with_path(shapes), jax.tree.leaves(
        specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


@pytest.mark.parametrize("name", sorted(MESHES))
def test_every_parameter_divides_on_each_mesh(name):
    leaves, specs = _mesh_specs(name)
    assert len(leaves) == len(specs)
    assert sum(int(np.prod(x.shape)) for _, x in leaves) > 13e9
    sharded_dims = 0
    for mesh_shape in MESHES[name]:
        sizes = dict(zip(sh.MESH_AXES, mesh_shape))
        bad = []
        for (path, leaf), spec in zip(leaves, specs):
            assert len(spec) <= len(leaf.shape), (jax.tree_util.keystr(path), spec, leaf.shape)
            for dim, axes in zip(leaf.shape, spec):
                axes = (axes,) if isinstance(axes, str) else (axes or ())
                split = int(np.prod([sizes[a] for a in axes]))
                sharded_dims += split > 1
                if dim % split:
                    bad.append(f"{jax.tree_util.keystr(path)} {leaf.shape} {spec}")
        assert not bad, f"{name} on mesh {mesh_shape}: indivisible parameters:\n" + "\n".join(bad)
    assert sharded_dims > 0


def test_chat_vocabulary_does_not_divide_by_four():
    """Why the chat meshes above use tensor <= 2."""
    leaves, specs = _mesh_specs("emu2_chat_37b")
    vocab = presets.get_config("emu2_chat_37b").llm.vocab_size
    assert vocab % 2 == 0 and vocab % 4
    assert any("tensor" in jax.tree.leaves(tuple(s)) and vocab in x.shape for (_, x), s in zip(leaves, specs))


def test_sharding_rule_overrides_replace_entries_in_place():
    rules = sh.rules_with_overrides([("act_batch", ["data", "fsdp", "tensor"]), ("vocab", None)])
    assert [name for name, _ in rules] == [name for name, _ in sh.LOGICAL_RULES]
    assert dict(rules)["act_batch"] == ("data", "fsdp", "tensor") and dict(rules)["vocab"] is None
    assert dict(rules)["mlp"] == dict(sh.LOGICAL_RULES)["mlp"]
    with pytest.raises(ValueError, match="'act_btch'.*unknown logical axis"):
        sh.rules_with_overrides([("act_btch", "data")])
    with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
        sh.rules_with_overrides([("mlp", "model")])


def test_batch_split_follows_the_rules_in_force():
    mesh = sh.create_mesh((2, 2, 2), jax.devices()[:8])
    assert sh.batch_shards(mesh) == 4  # rows over data x fsdp
    everywhere = sh.rules_with_overrides([("act_batch", ("data", "fsdp", "tensor"))])
    assert sh.batch_shards(mesh, everywhere) == 8
    assert sh.batch_sharding(mesh, everywhere).spec == jax.sharding.PartitionSpec(None, ("data", "fsdp", "tensor"))


def test_config_sharding_rules_reach_the_trainer():
    config = stage1.get_config("tiny")
    config.mesh_shape, config.global_batch_size = (2, 2, 2), 4
    train.create_trainer(config)  # 4 rows over data x fsdp = 4 shards
    config.sharding_rules = (("act_batch", ("data", "fsdp", "tensor")),)
    with pytest.raises(ValueError, match="global_batch_size=4 must divide .* over 8 batch shards"):
        train.create_trainer(config)
    config.global_batch_size = 8
    trainer = train.create_trainer(config)
    assert trainer.batch_sharding.spec == jax.sharding.PartitionSpec(None, ("data", "fsdp", "tensor"))
    assert dict(trainer.rules)["act_batch"] == ("data", "fsdp", "tensor")
