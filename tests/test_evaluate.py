"""`python -m emu2_jax.evaluate` end to end on tiny initial checkpoints and the embedded evaluation set,
its one-line errors, and its pieces in-process (scoring, continuation log-probabilities, features)."""
import json
import sys

import jax
import numpy as np
import pytest
from flax import linen as nn

from configs import decoder, stage2
from emu2_jax import checkpointing, evaluate, tasks
from emu2_jax.data import tokenizer as tk
from emu2_jax.evaluation import datasets, media, run
from emu2_jax.evaluation import prompts as eval_prompts
from emu2_jax.inference import checkpoints, prompts
from tests import cli


@pytest.fixture(scope="module")
def llm_run(tmp_path_factory):
    """A tiny stage-2 workdir (n_query 4, the tiny decoder's too) at its initial state."""
    return cli.write_initial_checkpoint(tmp_path_factory.mktemp("stage2"), stage2.get_config("tiny"))


@pytest.fixture(scope="module")
def decoder_run(tmp_path_factory):
    """A decoder-stage run's checkpoint of the tiny decoder with N(0, 0.02) parameters, saved by the
    trainer's checkpointing: initialising the tiny UNet and VAE the trainer's way takes over a minute on
    a loaded CPU, and evaluation only needs the shapes."""
    path = tmp_path_factory.mktemp("decoder")
    config = decoder.get_config("tiny")
    task = tasks.create(config)
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), task.dummy_batch(1))
    abstract = nn.unbox(jax.eval_shape(task.model.init, jax.random.key(0), zeros))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (rng.standard_normal(s.shape) * 0.02).astype(s.dtype), abstract)
    manager = checkpointing.create_manager(path, save_every_steps=1, keep=1, async_save=False)
    checkpointing.save_checkpoint(manager, 1, {"params": params}, {}, config, force=True)
    manager.wait_until_finished()
    manager.close()
    return str(path)


def evaluate_command(checkpoint, out, *args):
    result = cli.run([sys.executable, "-m", "emu2_jax.evaluate", f"--checkpoint={checkpoint}", f"--out={out}",
                      *args])
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1], [json.loads(line) for line in open(out / f"{args[0][7:]}.jsonl")]


def metrics_file(out, task):
    return json.loads((out / f"{task}_metrics.json").read_text())


# ---------------------------------------------------------------------------------------------
# The command.

def test_vqav2_zero_shot_with_release_beams(llm_run, tmp_path):
    line, records = evaluate_command(llm_run, tmp_path, "--task=vqav2", "--limit=4", "--batch_size=4")
    assert line.startswith("vqav2 vqa_accuracy=") and line.endswith("(n=4)")
    assert [r["key"] for r in records] == [e.key for e in datasets.read(
        "vqav2", **datasets.embedded_eval_data("vqav2"))][:4]
    for r in records:
        assert r["prompt"].startswith(tk.IMG_PLACEHOLDER) and eval_prompts.ZERO_SHOT_INSTRUCTION in r["prompt"]
        assert len(r["answers"]) == 10 and 0.0 <= r["score"] <= 1.0
    saved = metrics_file(tmp_path, "vqav2")
    assert saved["value"] == pytest.approx(np.mean([r["score"] for r in records]))
    assert (saved["settings"]["num_beams"], saved["settings"]["length_penalty"]) == (5, -1.0)
    assert saved["settings"]["max_new_tokens"] == 10 and not saved["settings"]["chat"]


def test_vqav2_two_shots_from_rices(llm_run, tmp_path):
    _, records = evaluate_command(llm_run, tmp_path, "--task=vqav2", "--shots=2", "--limit=3", "--num_beams=1",
                                  "--max_new_tokens=3", "--batch_size=4")
    examples = datasets.read("vqav2", **datasets.embedded_eval_data("vqav2"))
    shown = {e.key: f"{tk.IMG_PLACEHOLDER}based on the picture, {e.text} short answer: "
                    f"{eval_prompts.shot_answer(e.answers)}" for e in examples}
    for r in records:
        parts = r["prompt"].split(eval_prompts.SHOT_SEPARATOR + tk.IMG_PLACEHOLDER)
        assert len(parts) == 3, r["prompt"]
        shots = [parts[0], tk.IMG_PLACEHOLDER + parts[1]]
        own = next(e for e in examples if e.key == r["key"])
        assert parts[2] == f"based on the picture, {own.text} short answer:"
        picked = [k for shot in shots for k, text in shown.items() if text == shot]
        assert len(set(picked)) == 2 and r["key"] not in picked, (r["key"], picked)


def test_hateful_memes_chat_scores_and_roc_auc(llm_run, tmp_path):
    line, records = evaluate_command(llm_run, tmp_path, "--task=hateful_memes", "--chat", "--batch_size=8")
    value = metrics_file(tmp_path, "hateful_memes")["value"]
    assert line == f"hateful_memes roc_auc={value:.4f} (n=8)" and 0.0 <= value <= 1.0
    assert all(r["prompt"].startswith(tk.SYSTEM_ACADEMIC + " [USER]: ") for r in records)
    assert all(0.0 < r["score"] < 1.0 and r["prediction"] == ("yes" if r["score"] >= 0.5 else "no")
               for r in records)
    assert sorted(r["label"] for r in records) == [0] * 4 + [1] * 4


def test_coco_caption_cider(llm_run, tmp_path):
    line, records = evaluate_command(llm_run, tmp_path, "--task=coco_caption", "--num_beams=1", "--limit=3",
                                     "--max_new_tokens=5", "--batch_size=4")
    assert line.startswith("coco_caption cider_d=") and line.endswith("(n=3)")
    assert all(len(r["answers"]) == 5 and r["score"] >= 0.0 for r in records)
    assert metrics_file(tmp_path, "coco_caption")["value"] == pytest.approx(np.mean([r["score"] for r in records]))


def test_video_qa_few_shot(llm_run, tmp_path):
    line, records = evaluate_command(llm_run, tmp_path, "--task=msvd_qa", "--shots=1", "--frames=2", "--limit=2",
                                     "--num_beams=1", "--max_new_tokens=3", "--batch_size=2")
    assert line.startswith("msvd_qa exact_match=") and line.endswith("(n=2)")
    assert all(r["prompt"].count(tk.VID_PLACEHOLDER) == 2 for r in records)


def test_image_gen_clip_i(llm_run, decoder_run, tmp_path):
    line, records = evaluate_command(llm_run, tmp_path, "--task=image_gen", f"--decoder_checkpoint={decoder_run}",
                                     "--steps=2", "--limit=2", "--batch_size=2")
    assert line.startswith("image_gen clip_i=") and line.endswith("(n=2)")
    for r in records:
        assert -1.0 <= r["score"] <= 1.0
        assert (tmp_path / "image_gen_images").is_dir() and r["image"].endswith(".png")
        assert media.load_image(r["image"]).shape == (32, 32, 3)


def test_unknown_task_is_one_line(llm_run, tmp_path):
    result = cli.run([sys.executable, "-m", "emu2_jax.evaluate", f"--checkpoint={llm_run}", "--task=vqa",
                      f"--out={tmp_path}"])
    assert result.returncode != 0
    assert cli.message_lines(result.stderr) == [f"--task=vqa: not one of {', '.join(datasets.TASK_METRIC)}"]


# ---------------------------------------------------------------------------------------------
# One-line errors before model work (in-process: no checkpoint is read).

@pytest.mark.parametrize("kwargs, message", [
    ({"task": "gqa", "data": "/nowhere/gqa.json"}, r"^--data=/nowhere/gqa.json: no such file$"),
    ({"task": "gqa", "shots": 6}, r"^--shots=6: the support set \(.*gqa.json\) has only 5 examples besides"),
    ({"task": "gqa", "shots": 2, "chat": True}, r"^--shots=2: Emu2-Chat is evaluated zero-shot"),
    ({"task": "image_gen", "shots": 1}, r"^--task=image_gen: text-to-image prompts take neither"),
    ({"task": "hateful_memes", "limit": 1}, r"^--limit=1: every meme evaluated has label 0; ROC AUC"),
    ({"task": "gqa", "num_beams": 0}, r"^--num_beams=0: must be >= 1"),
    ({"task": "nope"}, r"^--task=nope: not one of vqav2"),
])
def test_bad_arguments_fail_before_loading(tmp_path, kwargs, message):
    with pytest.raises(SystemExit, match=message) as e:
        evaluate.evaluate(str(tmp_path / "no_checkpoint"), out=str(tmp_path / "out"), **kwargs)
    assert "\n" not in str(e.value)


def test_missing_checkpoint_and_out_file(tmp_path):
    with pytest.raises(SystemExit, match=r"^--checkpoint=.*no_checkpoint: no such file or directory$"):
        evaluate.evaluate(str(tmp_path / "no_checkpoint"), "gqa", str(tmp_path / "out"))
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match=r"^--out=.*file: is a file"):
        evaluate.evaluate(str(tmp_path), "gqa", str(tmp_path / "file"))


def test_image_gen_needs_a_decoder(llm_run, tmp_path):
    with pytest.raises(SystemExit, match=r"^--task=image_gen: give --decoder_checkpoint .* holds no visual decoder$"):
        evaluate.evaluate(llm_run, "image_gen", str(tmp_path / "out"))
    with pytest.raises(SystemExit, match=r"^--decoder_checkpoint=.*: a 'stage2' checkpoint, not the visual decoder"):
        evaluate.evaluate(llm_run, "image_gen", str(tmp_path / "out"), decoder_checkpoint=llm_run)


# ---------------------------------------------------------------------------------------------
# Pieces.

def test_scores_per_record():
    qa = [{"key": "a", "prediction": "Two", "answers": ["2"] * 10}, {"key": "b", "prediction": "x", "answers": ["y"]}]
    assert run.score("vqav2", [dict(r) for r in qa]) == pytest.approx(0.5)
    records = [dict(r) for r in qa]
    assert run.score("gqa", records) == 0.5 and [r["score"] for r in records] == [1.0, 0.0]
    memes = [{"score": s, "label": y} for s, y in [(0.9, 1), (0.2, 0), (0.4, 1), (0.6, 0)]]
    assert run.score("hateful_memes", memes) == pytest.approx(0.75)  # 3 of the 4 (hateful, not) pairs in order
    captions = [{"key": "a", "prediction": "a dog on grass", "answers": ["a dog on the grass", "a dog"]},
                {"key": "b", "prediction": "a red car", "answers": ["a red car parked", "a car"]}]
    value = run.score("coco_caption", captions)
    assert value == pytest.approx(np.mean([r["score"] for r in captions])) and value > 0


def test_clean_caption():
    assert run.clean_caption(" a cat on a mat. describing the image in detail. the image shows") == "a cat on a mat."
    assert run.clean_caption("a dog\nsecond line") == "a dog"


@pytest.fixture(scope="module")
def tiny_llm(tiny_emu2):
    return checkpoints.LoadedLlm(*tiny_emu2, None, "tiny")


def test_meme_scores_are_continuation_logprobs(tiny_llm):
    """The batched, padded, masked log-probabilities equal a direct sum over each continuation's tokens."""
    model, params, tok = tiny_llm.model, tiny_llm.params, tiny_llm.tokenizer
    memes = datasets.read("hateful_memes", **datasets.embedded_eval_data("hateful_memes"))[:3]
    records = run.score_memes(tiny_llm, memes, [[]] * 3, run.Settings(task="hateful_memes", batch_size=2))
    forward = jax.jit(lambda batch: jax.nn.log_softmax(model.apply({"params": params}, batch).text_logits[0]))
    for meme, record in zip(memes, records):
        logprobs = []
        for continuation in eval_prompts.yes_no_continuations():
            prompt_ids = prompts.build_row(tok, model.config, record["prompt"], [media.load_image(meme.image)]).ids
            row = prompts.build_row(tok, model.config, record["prompt"] + continuation, [media.load_image(meme.image)])
            start = run._shared_prefix(prompt_ids, row.ids)
            batch = prompts.batch([row], model.config, tok.pad_id)
            logp = np.asarray(forward(batch))
            logprobs.append(sum(logp[i - 1, row.ids[i]] for i in range(start, len(row.ids))))
        assert record["score"] == pytest.approx(eval_prompts.yes_probability(*logprobs), rel=1e-4, abs=1e-7)


def test_pooled_features_average_frames_and_ignore_batch_padding(tiny_llm):
    frames = [(np.random.default_rng(i).random((20, 30, 3)) * 255).astype(np.uint8) for i in range(3)]
    cfg, params = tiny_llm.model.config, tiny_llm.params
    single = media.pooled_features(cfg, params, [lambda f=f: [f] for f in frames], batch_size=1)
    clip = media.pooled_features(cfg, params, [lambda: frames[:2], lambda: frames[2:]], batch_size=3)
    np.testing.assert_allclose(clip[0], single[:2].mean(axis=0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(clip[1], single[2], rtol=1e-4, atol=1e-6)
