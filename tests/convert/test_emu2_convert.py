"""Whole-checkpoint conversion and parity of the full Emu2 model against the reference assembly
(timm EVA + avg_pool2d + linear projections + transformers LLaMA, as the official code computes it)."""
import dataclasses
import sys

import jax
import numpy as np
import pytest
import torch
from flax import linen as nn

from emu2_jax.convert.emu2 import convert_emu2, load_state_dict
from emu2_jax.data import images as image_lib
from emu2_jax.models import emu2, presets
from tests import cli
from tests.torch_refs import emu2_reference, emu2_reference_forward, state_dict_np

CFG = presets.get_config("tiny")


def _batch(rng: np.random.Generator, config=CFG) -> dict[str, np.ndarray]:
    """Two rows: text, image, text, image, text; every position supervised for its kind."""
    n, img = config.n_query, config.image_token_id
    row = [1, 20, img - 2] + [img] * n + [img - 1, 30, 31, img - 2] + [img] * n + [img - 1, 40, 41, 42]
    tokens = np.array([row, row], np.int32)
    tokens[1, -3:] = rng.integers(3, 1000, size=3)  # rows differ in their text
    targets = np.roll(tokens, -1, axis=1)
    size = config.vision.image_size
    return {
        "tokens": tokens,
        "targets": targets,
        "text_loss_mask": np.isin(targets, [img, img - 2], invert=True).astype(np.float32),
        "image_loss_mask": (targets == img).astype(np.float32),
        "segment_ids": np.ones_like(tokens),
        "positions": np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape).copy(),
        "images": image_lib.to_pixel_rows(rng.integers(0, 256, (2, 2, size, size, 3), dtype=np.uint8)),
        "image_valid": np.ones((2, 2), bool),
        "image_is_frame": np.zeros((2, 2), bool),
    }


@pytest.mark.parametrize("post_norm", [True, False])
def test_emu2_parity_with_reference_assembly(post_norm):
    config = dataclasses.replace(CFG, vision=dataclasses.replace(CFG.vision, post_norm=post_norm))
    reference = emu2_reference(config, seed=3)
    batch = _batch(np.random.default_rng(3), config)
    params = {"params": convert_emu2(state_dict_np(reference), config)}
    ours = emu2.Emu2Model(config).apply(params, batch)
    total, metrics = emu2.compute_losses(ours, batch)
    with torch.no_grad():
        ref = emu2_reference_forward(reference, {k: torch.from_numpy(v) for k, v in batch.items()}, config)
    logits_diff = np.abs(np.asarray(ours.text_logits) - ref["logits"].numpy()).max()
    pred_diff = np.abs(np.asarray(ours.visual_pred) - ref["visual_pred"].numpy()).max()
    assert logits_diff <= 1e-4 and pred_diff <= 1e-4, (logits_diff, pred_diff)
    np.testing.assert_allclose(metrics["text_loss"], ref["text_loss"].item(), atol=1e-4)
    np.testing.assert_allclose(metrics["image_loss"], ref["image_loss"].item(), atol=1e-4)
    assert float(metrics["image_tokens"]) == 4 * config.n_query  # [IMG] and n-1 <image> per image, 4 images
    assert float(metrics["image_loss"]) > 0


def test_hf_layout_and_files(tmp_path):
    from safetensors.numpy import save_file

    reference = emu2_reference(CFG, seed=1)
    native = state_dict_np(reference)
    hf = {("model." + k if k.startswith(("visual.", "decoder.")) else k): v for k, v in native.items()}
    save_file(hf, str(tmp_path / "model-00001-of-00001.safetensors"))
    converted = convert_emu2(load_state_dict(str(tmp_path)), CFG, layout="hf")
    expected = convert_emu2(native, CFG)
    jax.tree.map(np.testing.assert_array_equal, converted, expected)
    batch = _batch(np.random.default_rng(0))
    shapes = jax.eval_shape(lambda: nn.unbox(emu2.Emu2Model(CFG).init(jax.random.key(0), batch)))["params"]
    assert jax.tree.structure(shapes) == jax.tree.structure(converted)
    jax.tree.map(lambda s, a: np.testing.assert_equal(s.shape, a.shape), shapes, converted)


def test_errors_name_the_problem(tmp_path):
    native = state_dict_np(emu2_reference(CFG))
    with pytest.raises(ValueError, match="project_down.weight"):
        convert_emu2({k: v for k, v in native.items() if k != "project_down.weight"}, CFG)
    bad = dict(native, **{"project_up.weight": native["project_up.weight"].T})
    with pytest.raises(ValueError, match="project_up.weight: checkpoint shape"):
        convert_emu2(bad, CFG)
    with pytest.raises(FileNotFoundError, match="holds no .safetensors"):
        load_state_dict(str(tmp_path))


@pytest.fixture(scope="module")
def native():
    return state_dict_np(emu2_reference(CFG))


def test_unused_keys_are_an_error_unless_allowed(native):
    extra = dict(native, **{"totally_unexpected.weight": np.zeros(3, np.float32),
                            "project_up.bias": np.zeros(CFG.llm.hidden_size, np.float32)})
    with pytest.raises(ValueError, match=r"2 key\(s\) that no component reads: \['project_up.bias', "
                                         r"'totally_unexpected.weight'\].*--allow_unused_keys"):
        convert_emu2(extra, CFG)
    jax.tree.map(np.testing.assert_array_equal, convert_emu2(extra, CFG, allow_unused_keys=True),
                 convert_emu2(native, CFG))


def test_unreadable_source_files_are_named(tmp_path):
    from safetensors.numpy import save_file

    file = tmp_path / "model.safetensors"
    save_file({"w": np.ones((64, 64), np.float32)}, str(file))
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model.safetensors: cannot read it \(.+\)"):
        load_state_dict(str(file))

    torch.save({"w": torch.zeros(2), "step": 3}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model.bin: 'step' is a int, not a tensor"):
        load_state_dict(str(tmp_path / "pytorch_model.bin"))


def test_nonfinite_source_tensors_are_refused_unless_allowed(tmp_path):
    from safetensors.numpy import save_file

    weight = np.ones((4, 4), np.float32)
    weight[1, 2] = np.inf
    save_file({"ok": np.ones(2, np.float32), "decoder.lm.model.norm.weight": weight}, str(tmp_path / "m.safetensors"))
    with pytest.raises(ValueError, match=r"m.safetensors: tensor 'decoder.lm.model.norm.weight' holds 1 NaN/Inf "
                                         r"value\(s\).*--allow_nonfinite"):
        load_state_dict(str(tmp_path))
    assert not np.isfinite(load_state_dict(str(tmp_path), allow_nonfinite=True)["decoder.lm.model.norm.weight"]).all()


def test_existing_output_is_refused_before_reading(tmp_path):
    out = tmp_path / "converted"
    out.mkdir()
    # The checkpoint does not exist: the output is checked first, before hours of reading.
    result = cli.run([sys.executable, "-m", "emu2_jax.convert.emu2", f"--checkpoint={tmp_path / 'nowhere'}",
                      "--model=tiny", f"--out={out}"])
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [f"--out={out}: already exists; choose a new directory"], \
        result.stderr[-3000:]
