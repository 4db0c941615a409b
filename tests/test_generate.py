"""`python -m emu2_jax.generate` on tiny checkpoints written by the trainer; greedy decoding of
image prompts with left padding equals the argmax of full forwards."""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import decoder, gen
from emu2_jax import metrics, tasks
from emu2_jax import sharding as sh
from emu2_jax.data import tokenizer as tk
from emu2_jax.inference import checkpoints, prompts, text
from tests import cli, tb_events

EMBEDDED_IMAGE = str(sorted((tk.EMBEDDED_DIR / "images").iterdir())[0])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(gen-stage LLM workdir, decoder-stage workdir): tiny initial states saved by the trainer."""
    return (cli.write_initial_checkpoint(tmp_path_factory.mktemp("gen_run"), gen.get_config("tiny")),
            cli.write_initial_checkpoint(tmp_path_factory.mktemp("decoder_run"), decoder.get_config("tiny")))


def generate_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "emu2_jax.generate", *args]


def test_text_of_a_batch_of_prompts(runs, tmp_path):
    llm_run, _ = runs
    prompts_file = tmp_path / "prompts.jsonl"
    Image.open(EMBEDDED_IMAGE).save(tmp_path / "a.png")
    prompts_file.write_text(json.dumps({"prompt": "[<IMG_PLH>]Describe the image in details:", "images": ["a.png"]})
                            + "\n" + json.dumps({"prompt": "a photo of"}) + "\n")
    result = cli.run(generate_command(f"--checkpoint={llm_run}", f"--prompts_file={prompts_file}",
                                      "--max_new_tokens=5", "--num_beams=3", "--length_penalty=-1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(result.stdout.splitlines()) == 2  # one answer line per prompt (may be empty text)
    assert "new tokens in" in result.stderr


def test_images_and_embeddings(runs, tmp_path):
    llm_run, decoder_run = runs
    out = tmp_path / "out.png"
    result = cli.run(generate_command(
        f"--checkpoint={llm_run}", f"--decoder_checkpoint={decoder_run}", "--prompt=a red square",
        "--prompt=[<IMG_PLH>]", f"--image={EMBEDDED_IMAGE}", f"--output_image={out}", "--steps=2",
        f"--save_embeddings={tmp_path / 'e.npy'}"))
    assert result.returncode == 0, result.stderr[-3000:]
    size = decoder.get_config("tiny").data.decoder_image_size
    for i in range(2):  # a generated image and an autoencoded one
        image = np.asarray(Image.open(tmp_path / f"out_{i}.png"))
        assert image.shape == (size, size, 3) and image.std() > 0
    embeddings = np.load(tmp_path / "e.npy")
    assert embeddings.shape[0] == 2 and np.isfinite(embeddings).all()
    assert np.abs(embeddings[0] - embeddings[1]).max() > 0


@pytest.mark.parametrize("args, expected", [
    (["--prompt=[<IMG_PLH>] and [<IMG_PLH>]", f"--image={EMBEDDED_IMAGE}"], "hold 2 [<IMG_PLH>] but 1 --image"),
    (["--prompt=hi", "--image=/nowhere/x.png", "--prompt=[<IMG_PLH>]"], "--image=/nowhere/x.png: cannot read it"),
    (["--prompt=hi", "--num_beams=2", "--sample"], "beam sampling is not supported"),
    (["--prompt=hi", "--prompts_file=p.jsonl"], "not both and not neither"),
])
def test_bad_arguments_are_refused_before_loading(tmp_path, args, expected):
    result = cli.run(generate_command(f"--checkpoint={tmp_path / 'nowhere'}", *args))
    assert result.returncode != 0
    assert any(expected in line for line in cli.message_lines(result.stderr)), result.stderr[-2000:]


def test_checkpoint_errors_name_the_flag(runs, tmp_path):
    llm_run, decoder_run = runs
    missing = cli.run(generate_command(f"--checkpoint={tmp_path / 'nowhere'}", "--prompt=hi"))
    assert missing.returncode != 0 and f"--checkpoint={tmp_path / 'nowhere'}: no such" in missing.stderr
    wrong = cli.run(generate_command(f"--checkpoint={decoder_run}", "--prompt=hi"))
    assert wrong.returncode != 0 and "has no language model" in wrong.stderr


def test_greedy_with_images_and_left_padding_equals_full_forward(tiny_emu2, photos):
    model, params, tokenizer = tiny_emu2
    cfg = model.config
    rows = [prompts.build_row(tokenizer, cfg, "[<IMG_PLH>]a photo of", photos[:1]),
            prompts.build_row(tokenizer, cfg, "[<IMG_PLH>]", photos[1:])]
    batch = prompts.batch(rows, cfg, tokenizer.pad_id)
    steps = 6
    out = text.generate_text(model, params, batch, max_new_tokens=steps, stop_ids=(cfg.llm.vocab_size - 1,))
    forward = jax.jit(lambda row: model.apply({"params": params}, row).text_logits)
    for i, row in enumerate(rows):
        tokens = list(row.ids)
        for _ in range(steps):
            single = prompts.batch([prompts.Row(tokens, row.pixels, row.is_frame)], cfg, tokenizer.pad_id)
            tokens.append(int(jnp.argmax(forward(single)[0, -1])))
        assert out.rows()[i] == tokens[len(row.ids):]


def test_gen_stage_samples_draw_captions_through_a_decoder(runs, tmp_path):
    llm_run, decoder_run = runs
    config = gen.get_config("tiny")
    config.update(sample_decoder_checkpoint=decoder_run, sample_decoder_steps=2, sample_max_new_tokens=3)
    loaded = checkpoints.load_llm(llm_run)
    task = tasks.create(config)
    mesh = sh.create_mesh((1, 1, 1), jax.devices()[:1])
    sample = task.create_sampler(mesh, sh.LOGICAL_RULES, str(tmp_path))
    writer = metrics.SummaryWriter(str(tmp_path / "tb"))
    sample(3, loaded.params, writer)
    writer.close()
    size = decoder.get_config("tiny").data.decoder_image_size
    grid = np.asarray(Image.open(tmp_path / "samples" / "images_step_3.png"))
    assert grid.shape == (size, config.num_samples * (size + 2) - 2, 3) and grid.std() > 0
    assert (tmp_path / "samples" / "step_3.json").is_file()  # the captions as before
    logged = tb_events.read_images(tb_events.event_files(tmp_path / "tb")[0])
    np.testing.assert_array_equal(logged[3]["samples/generated"], grid)


def test_sharded_generation_equals_one_device(runs):
    """Params restored into the shards of their logical axes over 8 devices (fsdp), the cache and
    activations following the same rules, decode what one device decodes."""
    llm_run, _ = runs
    mesh = sh.create_mesh((1, -1, 1))
    single, sharded = checkpoints.load_llm(llm_run), checkpoints.load_llm(llm_run, mesh=mesh)
    kernel = sharded.params["llm"]["layers"]["0"]["mlp"]["up"]["kernel"]  # serving layout: per layer
    assert len({s.data.shape for s in kernel.addressable_shards}) == 1
    assert kernel.addressable_shards[0].data.size * mesh.size == kernel.size  # split 8 ways, not replicated
    batch = prompts.batch([prompts.build_row(single.tokenizer, single.model.config, p) for p in ("a b", "c")],
                          single.model.config, single.tokenizer.pad_id, slots=1)
    settings = dict(max_new_tokens=5, num_beams=2, stop_ids=(single.tokenizer.eos_id,))
    one = text.generate_text(single.model, single.params, batch, **settings)
    many = text.generate_text(sharded.model, sharded.params, batch, mesh=mesh, **settings)
    assert one.rows() == many.rows()
