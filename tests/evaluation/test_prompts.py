"""Prompts against the papers' wording (Emu2 appendix D, Emu Table 8) and the chat template."""
import math

import pytest

from emu2_jax.evaluation import prompts as pr
from emu2_jax.evaluation.datasets import Example

SYSTEM = "You are a helpful assistant, dedicated to provide concise and efficient answers."  # Emu2 appendix D
Q = Example("q", "what is on the table?", answers=("cup",) * 10)
SHOTS = [Example("s1", "what animal is this?", answers=("cat", "dog", "cat")),
         Example("s2", "is it raining?", answers=("no", "yes", "yes", "no"))]


def test_zero_shot_vqa_adds_the_instruction():
    # "[image] based on the picture, answer in one word or phrase. [question] short answer:"
    assert pr.build_prompt("vqav2", Q) == ("[<IMG_PLH>]based on the picture, answer in one word or phrase. "
                                           "what is on the table? short answer:")


def test_few_shot_vqa_joins_examples_with_period_space():
    assert pr.build_prompt("okvqa", Q, SHOTS) == (
        "[<IMG_PLH>]based on the picture, what animal is this? short answer: cat. "
        "[<IMG_PLH>]based on the picture, is it raining? short answer: no. "  # tie between no and yes: first
        "[<IMG_PLH>]based on the picture, what is on the table? short answer:")


def test_shot_answer_is_most_frequent_then_first():
    assert pr.shot_answer(["b", "a", "a", "b", "c", "a"]) == "a"
    assert pr.shot_answer(["x", "y"]) == "x"
    with pytest.raises(ValueError, match="without answers"):
        pr.shot_answer([])


def test_chat_template():
    assert pr.build_prompt("gqa", Q, chat=True) == (
        f"{SYSTEM} [USER]: [<IMG_PLH>]what is on the table? Answer the question using a single word or phrase."
        " [ASSISTANT]:")
    assert pr.build_prompt("msvd_qa", Q, chat=True).startswith(f"{SYSTEM} [USER]: [<VID_PLH>]what is on")
    with pytest.raises(ValueError, match="--shots=2: Emu2-Chat is evaluated zero-shot"):
        pr.build_prompt("vqav2", Q, SHOTS, chat=True)


def test_video_and_caption_prompts():
    assert pr.build_prompt("msrvtt_qa", Q) == ("[<VID_PLH>]a question about the video: answer in one word or "
                                               "phrase. what is on the table? answer:")
    shot = Example("c", answers=("A dog on a sofa.", "A brown dog."))
    assert pr.build_prompt("coco_caption", Example("q"), [shot]) == (
        "[<IMG_PLH>]describing the image in detail. the image shows a dog on a sofa. "
        "[<IMG_PLH>]describing the image in detail. the image shows")
    assert pr.build_prompt("coco_caption", Example("q"), chat=True) == (
        f"{SYSTEM} [USER]: [<IMG_PLH>]please provide an accurate and concise description of the given image."
        " [ASSISTANT]:")


def test_hateful_memes_prompt_and_score():
    meme = Example("m", "love thy neighbour", label=0)
    shots = [Example("h", "mean words", label=1), Example("k", "kind words", label=0)]
    assert pr.build_prompt("hateful_memes", meme, shots) == (
        '[<IMG_PLH>]based on the picture, the meme says "mean words". is it hateful? short answer: yes. '
        '[<IMG_PLH>]based on the picture, the meme says "kind words". is it hateful? short answer: no. '
        '[<IMG_PLH>]based on the picture, the meme says "love thy neighbour". is it hateful? short answer:')
    assert pr.yes_no_continuations() == (" yes", " no")
    assert pr.yes_no_continuations(chat=True) == (" Yes", " No")
    assert pr.yes_probability(math.log(0.6), math.log(0.2)) == pytest.approx(0.75)
    assert pr.yes_probability(-1000.0, 0.0) == pytest.approx(0.0) and pr.yes_probability(0.0, -1000.0) == 1.0


def test_image_gen_prompt_is_the_caption():
    assert pr.build_prompt("image_gen", Example("g", "a red bus")) == "a red bus"
    with pytest.raises(ValueError, match="neither shots nor the chat template"):
        pr.build_prompt("image_gen", Example("g", "a red bus"), chat=True)


@pytest.mark.parametrize("generated, expected", [
    ("it's a dog. based on the picture, what is", "a dog"),
    (" It is red.\nmore text", "red"),
    ("2.5 short answer: 3", "2.5"),
    ("yes", "yes"),
])
def test_clean_answer(generated, expected):
    assert pr.clean_answer(generated) == expected
