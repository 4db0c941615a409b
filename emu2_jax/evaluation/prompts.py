"""The papers' evaluation prompts: text with Emu2's `[<IMG_PLH>]` / `[<VID_PLH>]` placeholders, whose
visuals the caller passes in prompt order (the shots' first, the query's last).

Pretrained Emu2 (Emu2 paper, appendix D): each few-shot example is "[image]based on the picture,
{question} short answer: {answer}", the examples joined with ". " and followed by the query
"[image]based on the picture, {question} short answer:". Zero-shot the query becomes "[image]based on
the picture, answer in one word or phrase. {question} short answer:", since without examples the model
answers in sentences.

Emu2-Chat (evaluated zero-shot, appendix D): `{system} [USER]: {prompt} [ASSISTANT]:` with the academic
system message and LLaVA-1.5's output-format instruction "Answer the question using a single word or
phrase." after the question, as in the project's academic instruction data (data/embedded/chat.jsonl).

Where the papers give no Emu2 prompt:
- video QA: Emu's "a question about the video: {question} answer:" (Emu paper, Table 8, without its
  chain-of-thought caption), with the zero-shot instruction placed as for images.
- captioning: Emu's "describing the image in detail. the image shows" (Table 8); Emu2-Chat gets Emu-I's
  "please provide an accurate and concise description of the given image.".
- Hateful Memes: a VQA question about the meme and its text, answered yes / no. The ROC AUC score of a
  meme is the model's probability of "yes" against "no" after the prompt (`yes_no_continuations`,
  `yes_probability`); few-shot examples answer with their label.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

from emu2_jax.data import tokenizer as tk
from emu2_jax.evaluation.datasets import TASK_METRIC, VIDEO_TASKS, Example

SHOT_SEPARATOR = ". "
ZERO_SHOT_INSTRUCTION = "answer in one word or phrase. "
IMAGE_QA = "{visual}based on the picture, {instruction}{question} short answer:"
VIDEO_QA = "{visual}a question about the video: {instruction}{question} answer:"
CAPTION = "{visual}describing the image in detail. the image shows"
HATEFUL_QUESTION = 'the meme says "{text}". is it hateful?'
CHAT_TEMPLATE = "{system} [USER]: {prompt} [ASSISTANT]:"
CHAT_QA_INSTRUCTION = "Answer the question using a single word or phrase."
CHAT_CAPTION = "please provide an accurate and concise description of the given image."


def chat_prompt(prompt: str, system: str = tk.SYSTEM_ACADEMIC) -> str:
    """Emu2-Chat's single-turn template; the model's answer follows `[ASSISTANT]:`."""
    return CHAT_TEMPLATE.format(system=system, prompt=prompt)


def shot_answer(answers: Sequence[str]) -> str:
    """The answer a few-shot example shows: the most frequent of its answers (the first on ties)."""
    if not answers:
        raise ValueError("shot_answer: example without answers")
    counts = Counter(answers)
    return max(answers, key=lambda a: (counts[a], -answers.index(a)))


def _visual(task: str) -> str:
    return tk.VID_PLACEHOLDER if task in VIDEO_TASKS else tk.IMG_PLACEHOLDER


def _question(task: str, example: Example) -> str:
    return HATEFUL_QUESTION.format(text=example.text) if task == "hateful_memes" else example.text


def _base(task: str, example: Example, zero_shot: bool) -> str:
    """The pretrained model's prompt for `example`, up to where its answer goes."""
    if task == "coco_caption":
        return CAPTION.format(visual=_visual(task))
    template = VIDEO_QA if task in VIDEO_TASKS else IMAGE_QA
    return template.format(visual=_visual(task), instruction=ZERO_SHOT_INSTRUCTION if zero_shot else "",
                           question=_question(task, example))


def _target(task: str, example: Example) -> str:
    """What a few-shot example shows after its prompt (no final period: ". " joins the examples)."""
    if task == "hateful_memes":
        return "yes" if example.label == 1 else "no"
    target = shot_answer(example.answers).strip().rstrip(".")
    return target[:1].lower() + target[1:] if task == "coco_caption" else target  # "the image shows a ..."


def build_prompt(task: str, query: Example, shots: Sequence[Example] = (), *, chat: bool = False) -> str:
    """The prompt of `query` for `task`, after the few-shot `shots` (RICES order: most similar last).
    `chat`: Emu2-Chat's zero-shot prompt. image_gen prompts are the caption itself (Emu2-Gen)."""
    if task not in TASK_METRIC:
        raise ValueError(f"--task={task}: not one of {', '.join(TASK_METRIC)}")
    if (chat or shots) and task == "image_gen":
        raise ValueError(f"--task={task}: text-to-image prompts take neither shots nor the chat template")
    if chat and shots:
        raise ValueError(f"--shots={len(shots)}: Emu2-Chat is evaluated zero-shot")
    if task == "image_gen":
        return query.text
    if chat:
        if task == "coco_caption":
            return chat_prompt(_visual(task) + CHAT_CAPTION)
        return chat_prompt(f"{_visual(task)}{_question(task, query)} {CHAT_QA_INSTRUCTION}")
    examples = [f"{_base(task, s, zero_shot=False)} {_target(task, s)}" for s in shots]
    return SHOT_SEPARATOR.join([*examples, _base(task, query, zero_shot=not shots)])


def yes_no_continuations(chat: bool = False) -> tuple[str, str]:
    """The two answers Hateful Memes compares after `build_prompt`: (yes, no). Capitalised for Emu2-Chat,
    whose academic answers are ("Yes", "No"); lowercase like the few-shot targets otherwise."""
    return (" Yes", " No") if chat else (" yes", " no")


def yes_probability(logprob_yes: float, logprob_no: float) -> float:
    """The meme's score for the ROC AUC: P(yes) / (P(yes) + P(no)) = sigmoid(logprob_yes - logprob_no),
    from the summed token log-probabilities of each continuation (the first-token logits when both are
    one token)."""
    d = logprob_yes - logprob_no
    return 1 / (1 + math.exp(-d)) if d >= 0 else math.exp(d) / (1 + math.exp(d))


_NEXT_EXAMPLE = re.compile(r"based on the picture|a question about the video|short answer:", re.IGNORECASE)
_FILLER = re.compile(r"^(?:it is|it's)\s+", re.IGNORECASE)


def clean_answer(text: str) -> str:
    """A generated short answer as scored: its first line, cut where the model starts another example,
    without the leading "it is" / "it's" Emu's evaluation filters (articles go in the metrics' own
    normalisation) and without a final period."""
    line = _NEXT_EXAMPLE.split(text.strip().split("\n", 1)[0], 1)[0]
    return _FILLER.sub("", line.strip()).strip().rstrip(".").strip()
