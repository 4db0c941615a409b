"""A conversation prefills only each new turn; the result equals re-prefilling the whole conversation."""
import numpy as np
import pytest

from emu2_jax.inference import chat, prompts, text

QUESTION_1, QUESTION_2 = "[<IMG_PLH>]What is in the picture?", "And the colours?"


def test_incremental_turn_equals_full_prefill(tiny_emu2, photos):
    model, params, tokenizer = tiny_emu2
    cfg, system = model.config, prompts.system_message("chat")
    generation = {"max_new_tokens": 6, "stop_ids": (tokenizer.eos_id,)}
    talk = chat.Conversation(model, params, tokenizer, system="chat", generation=generation)
    talk.say(QUESTION_1, photos[:1])
    answer_1 = list(talk._pending)  # the generated ids and `</s>`: they open the next turn's chunk
    used = talk.used
    second = talk.say(QUESTION_2)
    assert used < talk.used <= used + 2 * talk.bucket  # turn 2 took only its own slots
    assert [u for u, _ in talk.turns] == [QUESTION_1, QUESTION_2]

    # The whole conversation as one prompt from an empty cache: the same ids in one prefill.
    turn_1 = prompts.build_row(tokenizer, cfg, prompts.chat_turn(QUESTION_1, first=True, system=system), photos[:1])
    turn_2 = prompts.build_row(tokenizer, cfg, prompts.chat_turn(QUESTION_2, first=False), add_bos=False)
    whole = prompts.Row(turn_1.ids + answer_1 + turn_2.ids, turn_1.pixels, turn_1.is_frame)
    state = text.prefill_prompt(model, params, text.init_cache(model, 1), prompts.batch([whole], cfg, tokenizer.pad_id))
    np.testing.assert_allclose(np.asarray(state.logits), np.asarray(talk._state.logits), atol=1e-4)
    assert int(state.next_position[0]) == int(talk._state.next_position[0]) == len(whole.ids)
    again = text.continue_text(model, params, state, **generation).rows()[0]
    assert tokenizer.decode(again, skip_special_tokens=True).strip() == second


def test_template_text_matches_the_release():
    assert prompts.chat_prompt([("hi", "hello")], "bye", system="SYS") == (
        "SYS [USER]: hi [ASSISTANT]: hello</s>[USER]: bye [ASSISTANT]:")
    assert prompts.chat_turn("q", first=True, system="", grounding=True) == "[USER]: q [ASSISTANT]:<grounding>"
    assert prompts.system_message("academic").startswith("You are a helpful assistant, dedicated to provide")
    assert prompts.system_message("emu1_image").startswith("You will be presented with an image")


def test_full_conversation_is_refused_before_work(tiny_emu2):
    model, params, tokenizer = tiny_emu2
    talk = chat.Conversation(model, params, tokenizer, generation={"max_new_tokens": 250})
    with pytest.raises(ValueError, match="positions for this turn; /reset"):
        talk.say("hello")
    assert talk.turns == [] and talk.used == 0
