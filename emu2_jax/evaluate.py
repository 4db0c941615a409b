r"""Benchmark evaluation of an Emu2 checkpoint (docs/inference.md#evaluation).

    python -m emu2_jax.evaluate --checkpoint=DIR --task=TASK --out=DIR [--data=FILE --images=DIR
        --questions=FILE --split=test] [--shots=k] [--limit=N]

Tasks (`evaluation.datasets.TASK_METRIC`): vqav2, okvqa, vizwiz, textvqa (VQA accuracy), gqa, msvd_qa,
msrvtt_qa (exact match), hateful_memes (ROC AUC), coco_caption (CIDEr-D) and image_gen (CLIP-I with
the model's own encoder; needs `--decoder_checkpoint`, or a converted Emu2-Gen as `--checkpoint`).
`--data` is the benchmark's own annotation file (`evaluation.datasets` documents each layout);
without it the embedded evaluation set of the task runs, so every task runs offline on CPU.

`--shots=k` prompts few-shot with k RICES examples from the support set (`--support`, default the
evaluated data itself, never the query); `--chat` wraps the zero-shot prompt in Emu2-Chat's template
(default: for a `chat`-stage run, or a converted checkpoint whose vocabulary has the chat tokens,
when zero-shot). Decoding defaults to the release's: 5 beams, length_penalty -1, 10 new tokens.

`--out` receives `<task>.jsonl` (per example: key, prompt, prediction, answers or label, score) and
`<task>_metrics.json` (the metric, count and settings); image_gen also writes `<task>_images/*.png`.
The last line on stdout is the metric, e.g. `vqav2 vqa_accuracy=0.1234 (n=8)`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

from absl import app, flags, logging

from emu2_jax import cli
from emu2_jax.convert.stream import CONFIG_FILE
from emu2_jax.evaluation import datasets, run
from emu2_jax.evaluation.datasets import TASK_METRIC
from emu2_jax.inference import checkpoints


def _read(task: str, data: str, images: str | None, questions: str | None, split: str,
          names: tuple[str, str] = ("data", "questions")) -> list[datasets.Example]:
    """`datasets.read`, with a one-line error naming the flag of a missing file first."""
    for flag, path in zip(names, (data, questions)):
        if path is not None and not os.path.isfile(path):
            raise SystemExit(f"--{flag}={path}: no such file")
    try:
        return datasets.read(task, data, images=images, questions=questions, split=split)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def check_settings(settings: run.Settings, chat: bool | None, limit: int) -> None:
    """One-line errors for arguments that can never work, before any file is read."""
    if settings.task not in TASK_METRIC:
        raise SystemExit(f"--task={settings.task}: not one of {', '.join(TASK_METRIC)}")
    for name in ("batch_size", "max_new_tokens", "num_beams", "frames", "steps"):
        if getattr(settings, name) < 1:
            raise SystemExit(f"--{name}={getattr(settings, name)}: must be >= 1")
    for name, value in (("shots", settings.shots), ("limit", limit)):
        if value < 0:
            raise SystemExit(f"--{name}={value}: must be >= 0")
    if settings.task == "image_gen" and (settings.shots or chat):
        raise SystemExit("--task=image_gen: text-to-image prompts take neither --shots nor --chat")
    if chat and settings.shots:
        raise SystemExit(f"--shots={settings.shots}: Emu2-Chat is evaluated zero-shot; drop --chat to prompt "
                         f"few-shot with the pretrained model's template")


def read_examples(task: str, *, data: str | None, images: str | None, questions: str | None, split: str,
                  support: str | None, support_images: str | None, support_questions: str | None,
                  support_split: str | None, shots: int, limit: int
                  ) -> tuple[list[datasets.Example], list[datasets.Example]]:
    """(queries, support set); the support set is the whole evaluated data unless `support` is given."""
    paths = {"data": data, "images": images, "questions": questions}
    if data is None:
        paths = {**datasets.embedded_eval_data(task), **{k: v for k, v in paths.items() if v is not None}}
        paths.setdefault("questions", None)
    everything = _read(task, paths["data"], paths["images"], paths["questions"], split)
    queries = everything[:limit] if limit else everything
    if task == "hateful_memes" and len({q.label for q in queries}) < 2:
        where = f"--limit={limit}: every meme evaluated" if limit else f"--data={paths['data']}: every meme"
        raise SystemExit(f"{where} has label {queries[0].label}; ROC AUC needs hateful and not-hateful ones")
    if not shots:
        return queries, []
    if support is None:
        support_set = everything
    else:
        support_set = _read(task, support, support_images, support_questions, support_split or "train",
                            names=("support", "support_questions"))
    support_keys = {e.key for e in support_set}
    available = len(support_set) - any(q.key in support_keys for q in queries)
    if shots > available:
        raise SystemExit(f"--shots={shots}: the support set ({support or paths['data']}) has only {available} "
                         f"examples besides the query")
    return queries, support_set


def auto_chat(checkpoint: str, chat: bool | None, shots: int, task: str) -> bool | None:
    """--chat as given; by default Emu2-Chat's template for a chat model evaluated zero-shot: a
    `chat`-stage run, or a converted checkpoint whose tokenizer has [USER] / [ASSISTANT]."""
    if chat is not None:
        return chat
    if shots or task == "image_gen":
        return False
    config = checkpoints.run_config(checkpoint)
    if config is not None:
        return config.get("stage") == "chat"
    return None  # a converted checkpoint: decided by its tokenizer once loaded


def evaluate(checkpoint: str, task: str, out: str, *, data: str | None = None, images: str | None = None,
             questions: str | None = None, split: str = "test", support: str | None = None,
             support_images: str | None = None, support_questions: str | None = None,
             support_split: str | None = None, chat: bool | None = None, limit: int = 0,
             tokenizer: str | None = None, decoder_checkpoint: str | None = None, **options: Any) -> dict[str, Any]:
    """Evaluates `checkpoint` on `task`, writes the results to `out`, returns the metrics record.
    `options`: the fields of `run.Settings` (shots, batch_size, max_new_tokens, num_beams, ...)."""
    settings = run.Settings(task=task, **options)
    check_settings(settings, chat, limit)
    queries, support_set = read_examples(
        task, data=data, images=images, questions=questions, split=split, support=support,
        support_images=support_images, support_questions=support_questions, support_split=support_split,
        shots=settings.shots, limit=limit)
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"--out={out}: is a file; name the directory to write {task}.jsonl into")
    for flag, path in (("checkpoint", checkpoint), ("decoder_checkpoint", decoder_checkpoint)):
        if path is not None and not os.path.exists(os.path.expanduser(path)):
            raise SystemExit(f"--{flag}={path}: no such file or directory")
    use_chat = auto_chat(checkpoint, chat, settings.shots, task)
    decoder_path = decoder_source(checkpoint, decoder_checkpoint) if task == "image_gen" else None

    started = time.perf_counter()
    llm = checkpoints.load_llm(checkpoint, tokenizer=tokenizer)
    if use_chat is None:
        use_chat = llm.tokenizer.with_chat_tokens
    settings = dataclasses.replace(settings, chat=use_chat)
    decoder = checkpoints.load_decoder(decoder_path) if decoder_path else None
    logging.info("Evaluating %s on %s: %d examples%s, %d-shot, %s prompts; checkpoint %s", task,
                 data or "the embedded set", len(queries), f" (--limit={limit})" if limit else "", settings.shots,
                 "Emu2-Chat" if use_chat else "pretrained", llm.path)
    os.makedirs(out, exist_ok=True)
    image_dir = os.path.join(out, f"{task}_images") if task == "image_gen" else None
    if image_dir:
        os.makedirs(image_dir, exist_ok=True)
    value, records = run.run(llm, queries, support_set, settings, decoder=decoder, image_dir=image_dir)

    with open(os.path.join(out, f"{task}.jsonl"), "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    result = {"task": task, "metric": TASK_METRIC[task], "value": value, "count": len(records),
              "seconds": round(time.perf_counter() - started, 1),
              "settings": {**dataclasses.asdict(settings), "checkpoint": llm.path, "decoder_checkpoint":
                           decoder.path if decoder else None, "data": data or "embedded", "split": split,
                           "limit": limit, "support": support if settings.shots else None}}
    with open(os.path.join(out, f"{task}_metrics.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    logging.info("Wrote %s and %s in %.1fs.", os.path.join(out, f"{task}.jsonl"),
                 os.path.join(out, f"{task}_metrics.json"), result["seconds"])
    return result


def decoder_source(checkpoint: str, decoder_checkpoint: str | None) -> str:
    """Where image_gen's visual decoder loads from: `--decoder_checkpoint`, else a converted Emu2-Gen
    `--checkpoint` (which holds encoder, UNet and VAE); a one-line error before any weights are read."""
    if decoder_checkpoint is not None:
        stage = (checkpoints.run_config(decoder_checkpoint) or {}).get("stage", "decoder")
        if stage != "decoder":
            raise SystemExit(f"--decoder_checkpoint={decoder_checkpoint}: a {stage!r} checkpoint, not the visual "
                             f"decoder's (configs/decoder.py)")
        return decoder_checkpoint
    if not os.path.isfile(os.path.join(os.path.expanduser(checkpoint), CONFIG_FILE)):
        raise SystemExit(f"--task=image_gen: give --decoder_checkpoint (a decoder-stage run or a converted "
                         f"Emu2-Gen); --checkpoint={checkpoint} holds no visual decoder")
    return checkpoint


def summary_line(result: dict[str, Any]) -> str:
    return f"{result['task']} {result['metric']}={result['value']:.4f} (n={result['count']})"


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(cli.OwnInfoOnly())
    f = flags.FLAGS
    result = evaluate(
        f.checkpoint, f.task, f.out, data=f.data, images=f.images, questions=f.questions, split=f.split,
        support=f.support, support_images=f.support_images, support_questions=f.support_questions,
        support_split=f.support_split, chat=f.chat, limit=f.limit, tokenizer=f.tokenizer,
        decoder_checkpoint=f.decoder_checkpoint, shots=f.shots, batch_size=f.batch_size,
        max_new_tokens=f.max_new_tokens, num_beams=f.num_beams, length_penalty=f.length_penalty, frames=f.frames,
        steps=f.steps, guidance=f.guidance, seed=f.seed)
    print(summary_line(result))


if __name__ == "__main__":  # flags only for the command, so the module imports next to others' flags
    flags.DEFINE_string("checkpoint", None, "LLM-stage workdir (or its checkpoints/ or a step folder), or a "
                        "converted Emu2 / Emu2-Chat / Emu2-Gen.")
    flags.DEFINE_string("task", None, f"One of {', '.join(TASK_METRIC)}.")
    flags.DEFINE_string("out", None, "Directory for <task>.jsonl and <task>_metrics.json.")
    flags.DEFINE_string("data", None, "The benchmark's annotation file; default: the embedded evaluation set.")
    flags.DEFINE_string("images", None, "Folder the data's image / video names are relative to; default: "
                        "the folder holding --data.")
    flags.DEFINE_string("questions", None, "vqav2 / okvqa: the questions json (--data is the annotations).")
    flags.DEFINE_string("split", "test", "coco_caption: the Karpathy split to evaluate.")
    flags.DEFINE_integer("shots", 0, "Few-shot examples per query, chosen by RICES.")
    flags.DEFINE_string("support", None, "Support set for --shots (same layout as --data, e.g. the training "
                        "annotations); default: the evaluated data, without the query.")
    flags.DEFINE_string("support_images", None, "Image folder of --support; default: the folder holding it.")
    flags.DEFINE_string("support_questions", None, "vqav2 / okvqa: the questions json of --support.")
    flags.DEFINE_string("support_split", None, "coco_caption: the Karpathy split of --support (default train).")
    flags.DEFINE_bool("chat", None, "Emu2-Chat's prompt template (zero-shot); default: for a chat model, zero-shot.")
    flags.DEFINE_integer("limit", 0, "Evaluate only the first N examples (0: all).")
    flags.DEFINE_integer("batch_size", 8, "Prompts per model call.")
    flags.DEFINE_integer("max_new_tokens", 10, "Tokens generated per answer or caption.")
    flags.DEFINE_integer("num_beams", 5, "Beam width (1: greedy).")
    flags.DEFINE_float("length_penalty", -1.0, "Beam-search length penalty (the release's -1 favours short answers).")
    flags.DEFINE_integer("frames", 8, "Frames sampled uniformly per clip (msvd_qa, msrvtt_qa).")
    flags.DEFINE_string("tokenizer", None, "sentencepiece tokenizer.model; default: the checkpoint's.")
    flags.DEFINE_string("decoder_checkpoint", None, "image_gen: decoder-stage workdir or converted Emu2-Gen.")
    flags.DEFINE_integer("steps", 50, "image_gen: Euler sampling steps.")
    flags.DEFINE_float("guidance", 3.0, "image_gen: classifier-free guidance scale.")
    flags.DEFINE_integer("seed", 0, "image_gen: seed of the initial latents.")
    flags.mark_flags_as_required(["checkpoint", "task", "out"])
    app.run(main)
