"""The benchmarks' standard annotation files read into uniform `Example`s, and the embedded evaluation set.

On the command line (`python -m emu2_jax.evaluate --task=T --data=FILE [--images=DIR] [--questions=FILE]
[--split=S]`) `--data` is the benchmark's own file and `--images` the folder its image / video names are
relative to (default: the folder holding `--data`). `read(task, data, images=, questions=, split=)`:

- vqav2, okvqa: `--data` the annotations json `{"annotations": [{"question_id", "answers": [{"answer"}]}]}`,
  `--questions` the questions json `{"data_subtype", "questions": [{"image_id", "question", "question_id"}]}`;
  image `COCO_{data_subtype}_{image_id:012d}.jpg`.
- vizwiz: `[{"image", "question", "answers": [{"answer"}]}]`; image `{image}`.
- textvqa: `{"data": [{"question_id", "question", "image_id", "answers": [str]}]}`; image `{image_id}.jpg`.
- gqa: `{question_id: {"imageId", "question", "answer"}}`; image `{imageId}.jpg`.
- msvd_qa, msrvtt_qa: `[{"video" or "video_id", "question", "answer"}]` (optional `"question_id"` / `"id"`);
  clip `{video}`, or for `video_id` the first of `video{id}` and `vid{id}`, bare or with .mp4, .avi, .gif
  (MSRVTT / MSVD names): a video file (.mp4, .avi, ...; PyAV), an animated GIF or a folder of frames
  (`emu2_jax.video_io.read_video`).
- hateful_memes: jsonl `{"id", "img", "label", "text"}`; image `{img}` (`img/01235.png`: `--images` is
  the dataset folder, the default).
- coco_caption: Karpathy's `dataset_coco.json` `{"images": [{"filepath", "filename", "split",
  "sentences": [{"raw"}], "cocoid"}]}`, `--split=test` (default), val, train or restval; image
  `{filepath}/{filename}` (`--images` holds val2014/ and train2014/).
- image_gen: jsonl `{"prompt", "image"}` (optional `"id"`); `{image}` is the reference image.

Every image / video must lie inside `--images` (an absolute path or a `..` leaving it is an error) and
exist; both are checked while reading, before any model work, with a one-line error naming the file.
Few-shot support sets (RICES) are read the same way from the benchmark's training files.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np

from emu2_jax.data import tokenizer as tk

# task -> the name of its metric in `metrics` ("clip_i": mean `cosine_similarity` of encoder features).
TASK_METRIC: dict[str, str] = {
    "vqav2": "vqa_accuracy", "okvqa": "vqa_accuracy", "vizwiz": "vqa_accuracy", "textvqa": "vqa_accuracy",
    "gqa": "exact_match", "msvd_qa": "exact_match", "msrvtt_qa": "exact_match",
    "hateful_memes": "roc_auc", "coco_caption": "cider_d", "image_gen": "clip_i",
}
VIDEO_TASKS = ("msvd_qa", "msrvtt_qa")


@dataclasses.dataclass(frozen=True)
class Example:
    """One evaluation example. `text`: the question (QA), the meme's text (hateful_memes) or the prompt
    (image_gen); empty for captioning. `image` / `video`: absolute paths. `answers`: the human answers
    (10 for VQA), the one answer (GQA, video QA) or the reference captions. `label`: 1 = hateful.
    `features`: the encoder's pooled features, set later by the caller (RICES) with `dataclasses.replace`."""
    key: str
    text: str = ""
    image: str | None = None
    video: str | None = None
    answers: tuple[str, ...] = ()
    label: int | None = None
    features: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)


def _load(path: str, flag: str = "--data") -> Any:
    """JSON, or JSON lines for a `.jsonl` file."""
    try:
        with open(path, encoding="utf-8") as f:
            if path.endswith(".jsonl"):
                return [json.loads(line) for line in f if line.strip()]
            return json.load(f)
    except OSError as e:
        raise ValueError(f"{flag}={path}: cannot read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag}={path}: not valid JSON ({e})") from None


def _get(row: Any, name: str, where: str, kind: type = object) -> Any:
    """`row[name]`, which must exist and be a `kind`."""
    if not isinstance(row, dict) or name not in row:
        raise ValueError(f"{where}: lacks {name!r}")
    if not isinstance(row[name], kind):
        raise ValueError(f"{where}: {name!r} is not a {kind.__name__}")
    return row[name]


def _entries(obj: Any, where: str) -> list:
    if not isinstance(obj, list):
        raise ValueError(f"{where}: want a list of entries, got {type(obj).__name__}")
    return obj


def _inside(root: str, name: Any, where: str) -> str:
    """Absolute path of `name` under `root`: an error when it leaves `root` or does not exist."""
    root = os.path.abspath(root)
    path = os.path.abspath(os.path.join(root, str(name)))
    if path == root or os.path.commonpath([root, path]) != root:
        raise ValueError(f"{where}: {str(name)!r} is not inside --images={root}")
    if not os.path.exists(path):
        raise ValueError(f"{where}: {path} not found")
    return path


def _answer_dicts(row: dict, where: str) -> tuple[str, ...]:
    return tuple(str(_get(a, "answer", where)) for a in _get(row, "answers", where, list))


def read_vqa(data: str, questions: str, images: str) -> list[Example]:
    """VQAv2 / OKVQA: the annotated questions, images by COCO id."""
    annotations = _entries(_get(_load(data), "annotations", f"--data={data}"), f"--data={data}")
    qs, where_q = _load(questions, "--questions"), f"--questions={questions}"
    subtype = _get(qs, "data_subtype", where_q, str)
    by_id = {_get(q, "question_id", f"{where_q}: question {i}"): q
             for i, q in enumerate(_entries(_get(qs, "questions", where_q), where_q))}
    out = []
    for i, ann in enumerate(annotations):
        where = f"--data={data}: annotation {i}"
        qid = _get(ann, "question_id", where)
        if qid not in by_id:
            raise ValueError(f"{where}: question_id {qid} is not in --questions={questions}")
        q = by_id[qid]
        name = f"COCO_{subtype}_{_get(q, 'image_id', where, int):012d}.jpg"
        out.append(Example(str(qid), str(_get(q, "question", where)), image=_inside(images, name, where),
                           answers=_answer_dicts(ann, where)))
    return out


def read_vizwiz(data: str, images: str) -> list[Example]:
    out = []
    for i, row in enumerate(_entries(_load(data), f"--data={data}")):
        where = f"--data={data}: entry {i}"
        name = _get(row, "image", where, str)
        out.append(Example(name, str(_get(row, "question", where)), image=_inside(images, name, where),
                           answers=_answer_dicts(row, where)))
    return out


def read_textvqa(data: str, images: str) -> list[Example]:
    out = []
    for i, row in enumerate(_entries(_get(_load(data), "data", f"--data={data}"), f"--data={data}")):
        where = f"--data={data}: entry {i}"
        image = _inside(images, f"{_get(row, 'image_id', where)}.jpg", where)
        out.append(Example(str(_get(row, "question_id", where)), str(_get(row, "question", where)), image=image,
                           answers=tuple(str(a) for a in _get(row, "answers", where, list))))
    return out


def read_gqa(data: str, images: str) -> list[Example]:
    questions = _load(data)
    if not isinstance(questions, dict):
        raise ValueError(f"--data={data}: want {{question_id: question}}, got {type(questions).__name__}")
    out = []
    for qid, row in questions.items():
        where = f"--data={data}: question {qid}"
        image = _inside(images, f"{_get(row, 'imageId', where)}.jpg", where)
        out.append(Example(str(qid), str(_get(row, "question", where)), image=image,
                           answers=(str(_get(row, "answer", where)),)))
    return out


def _video(root: str, row: dict, where: str) -> str:
    """The clip named by "video", or the MSRVTT / MSVD file or folder named after "video_id"."""
    if isinstance(row, dict) and "video" in row:
        return _inside(root, row["video"], where)
    vid = _get(row, "video_id", where)
    names = [f"{prefix}{vid}{suffix}" for prefix in ("video", "vid")
             for suffix in ("", ".mp4", ".avi", ".gif")]
    found = next((n for n in names if os.path.exists(os.path.join(root, n))), None)
    if found is None:
        raise ValueError(f"{where}: none of {', '.join(names)} in --images={os.path.abspath(root)}")
    return _inside(root, found, where)


def read_video_qa(data: str, images: str) -> list[Example]:
    """MSVD-QA / MSRVTT-QA: one question and answer per clip."""
    out = []
    for i, row in enumerate(_entries(_load(data), f"--data={data}")):
        where = f"--data={data}: entry {i}"
        video = _video(images, row, where)
        key = str(row.get("question_id", row.get("id", i)))
        out.append(Example(key, str(_get(row, "question", where)), video=video,
                           answers=(str(_get(row, "answer", where)),)))
    return out


def read_hateful_memes(data: str, images: str) -> list[Example]:
    out = []
    for i, row in enumerate(_entries(_load(data), f"--data={data}")):
        where = f"--data={data}: line {i + 1}"
        label = _get(row, "label", where, int)
        if label not in (0, 1):
            raise ValueError(f"{where}: label {label} is not 0 or 1")
        out.append(Example(str(_get(row, "id", where)), str(_get(row, "text", where)),
                           image=_inside(images, _get(row, "img", where, str), where), label=label))
    return out


def read_coco_captions(data: str, images: str, split: str = "test") -> list[Example]:
    """Karpathy's COCO split: the images of `split` with their reference sentences."""
    out = []
    for i, row in enumerate(_entries(_get(_load(data), "images", f"--data={data}"), f"--data={data}")):
        where = f"--data={data}: image {i}"
        if _get(row, "split", where) != split:
            continue
        name = os.path.join(str(_get(row, "filepath", where)), str(_get(row, "filename", where)))
        refs = tuple(str(_get(s, "raw", where)) for s in _get(row, "sentences", where, list))
        out.append(Example(str(_get(row, "cocoid", where)), image=_inside(images, name, where), answers=refs))
    return out


def read_image_gen(data: str, images: str) -> list[Example]:
    """Text-to-image prompts with the reference image CLIP-I compares the generated one to."""
    out = []
    for i, row in enumerate(_entries(_load(data), f"--data={data}")):
        where = f"--data={data}: line {i + 1}"
        image = _inside(images, _get(row, "image", where, str), where)
        out.append(Example(str(row.get("id", i)), str(_get(row, "prompt", where)), image=image))
    return out


READERS: dict[str, Callable[[str, str], list[Example]]] = {
    "vizwiz": read_vizwiz, "textvqa": read_textvqa, "gqa": read_gqa, "msvd_qa": read_video_qa,
    "msrvtt_qa": read_video_qa, "hateful_memes": read_hateful_memes, "image_gen": read_image_gen,
}


def read(task: str, data: str, *, images: str | None = None, questions: str | None = None,
         split: str = "test") -> list[Example]:
    """The examples of `task` in `data` (see the module docstring for each task's files), with unique keys."""
    if task not in TASK_METRIC:
        raise ValueError(f"--task={task}: not one of {', '.join(TASK_METRIC)}")
    images = images if images is not None else os.path.dirname(os.path.abspath(data))
    if not os.path.isdir(images):
        raise ValueError(f"--images={images}: not a folder")
    if task in ("vqav2", "okvqa"):
        if questions is None:
            raise ValueError(f"--task={task}: needs --questions=<questions json> with --data=<annotations json>")
        reader = functools.partial(read_vqa, questions=questions)
    elif task == "coco_caption":
        reader = functools.partial(read_coco_captions, split=split)
    else:
        reader = READERS[task]
    examples = reader(data, images=images)
    if not examples:
        raise ValueError(f"--data={data}: no {task} examples" + (f" in split {split!r}" if task == "coco_caption"
                                                               else ""))
    key, count = Counter(e.key for e in examples).most_common(1)[0]
    if count > 1:
        raise ValueError(f"--data={data}: key {key!r} appears {count} times")
    return examples


# ---------------------------------------------------------------------------------------------
# The embedded evaluation set (emu2_jax/data/embedded/eval/README.md).

EVAL_DIR = tk.EMBEDDED_DIR / "eval"
_EMBEDDED: dict[str, dict[str, str]] = {
    "vqav2": {"data": "vqav2_annotations.json", "questions": "vqav2_questions.json", "images": "coco/val2014"},
    "okvqa": {"data": "okvqa_annotations.json", "questions": "okvqa_questions.json", "images": "coco/val2014"},
    "vizwiz": {"data": "vizwiz.json", "images": "../images"},
    "textvqa": {"data": "textvqa.json", "images": "../images"},
    "gqa": {"data": "gqa.json", "images": "../images"},
    "msvd_qa": {"data": "msvd_qa.json", "images": "videos"},
    "msrvtt_qa": {"data": "msrvtt_qa.json", "images": "videos"},
    "hateful_memes": {"data": "hateful_memes.jsonl", "images": "../images"},
    "coco_caption": {"data": "coco_karpathy.json", "images": "coco"},
    "image_gen": {"data": "image_gen.jsonl", "images": "../images"},
}


def embedded_eval_data(task: str) -> dict[str, str]:
    """`read`'s keyword arguments (the CLI's --data, --images, --questions) for the embedded set of `task`,
    as absolute paths. It is tiny (6-8 examples) and serves as its own few-shot support set."""
    if task not in _EMBEDDED:
        raise ValueError(f"--task={task}: not one of {', '.join(_EMBEDDED)}")
    return {flag: os.path.normpath(EVAL_DIR / name) for flag, name in _EMBEDDED[task].items()}
