"""A multi-turn conversation that lives in the KV cache (docs/inference.md#chat).

Each turn prefills only its own tokens: the previous answer (the ids just generated) with its
`</s>`, then the new user turn in the chat template, on top of the cache the earlier turns left.
Earlier turns are never recomputed (the release re-encodes the whole conversation every turn).
Generation itself runs on a copy of the state, so any decoding (greedy, sampling, beam search)
leaves the conversation's cache as it was.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from emu2_jax.data import tokenizer as tk
from emu2_jax.inference import prompts, text
from emu2_jax.models.emu2 import Emu2Model

PyTree = Any


@dataclasses.dataclass
class Conversation:
    model: Emu2Model
    params: PyTree
    tokenizer: tk.Tokenizer
    system: str = "chat"              # prompts.system_message name or literal text
    grounding: bool = False
    generation: dict[str, Any] = dataclasses.field(default_factory=lambda: {"max_new_tokens": 256})
    bucket: int = 16                  # turns are padded to a multiple of this many columns (cache slots)
    turns: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    _state: text.Decoding | None = None
    _pending: list[int] = dataclasses.field(default_factory=list)  # last answer + `</s>`, not yet in the cache
    _used: int = 0                   # cache slots taken

    @property
    def capacity(self) -> int:
        return self.model.config.llm.max_cache_length

    @property
    def used(self) -> int:
        return self._used

    def reset(self) -> None:
        self.turns, self._state, self._pending, self._used = [], None, [], 0

    def turn_row(self, user: str, images: Sequence[np.ndarray] = ()) -> prompts.Row:
        """The ids this turn adds to the cache: the pending answer and `</s>`, then the user turn."""
        first = self._state is None
        turn = prompts.chat_turn(user, first=first, system=prompts.system_message(self.system),
                                 grounding=self.grounding)
        row = prompts.build_row(self.tokenizer, self.model.config, turn, images, add_bos=first)
        return dataclasses.replace(row, ids=self._pending + row.ids)

    def say(self, user: str, images: Sequence[np.ndarray] = (), *, rng: jax.Array | None = None) -> str:
        """Adds a user turn (its `[<IMG_PLH>]` take `images`, uint8 [H, W, 3]) and returns the answer."""
        row = self.turn_row(user, images)
        chunk = prompts.batch([row], self.model.config, self.tokenizer.pad_id)
        columns = text.bucket_length(len(row.ids), self.bucket)
        max_new = self.generation["max_new_tokens"]
        if self._used + columns + max_new > self.capacity:
            raise ValueError(f"the conversation needs {self._used + columns + max_new} of the model's "
                             f"{self.capacity} positions for this turn; /reset to start a new one")
        chunk = text.pad_prompt(chunk, columns)
        if self._state is None:
            cache = text.init_cache(self.model, 1)
            offset = 0
        else:
            cache, offset = self._state.cache, int(self._state.next_position[0])
        chunk["positions"] = np.where(chunk["segment_ids"] > 0, chunk["positions"] + offset, 0).astype(np.int32)
        state = text.prefill_prompt(self.model, self.params, cache, chunk)
        generated = text.continue_text(self.model, self.params, state, rng=rng, **self.generation)
        answer_ids = generated.rows()[0]
        # Kept only now: an error or Ctrl-C above leaves the conversation as it was, not a cache
        # holding a turn that `turns` and the pending answer do not know about.
        self._state, self._used, self._pending = state, self._used + columns, answer_ids + [self.tokenizer.eos_id]
        # Grounding answers are their `<phrase>` / `<object>` / `<patch_index_*>` tokens: keep them.
        answer = self.tokenizer.decode(answer_ids, skip_special_tokens=not self.grounding).strip()
        self.turns.append((user, answer))
        return answer

    @property
    def last_answer_ids(self) -> list[int]:
        """The ids of the last answer, without its `</s>` (for a front end's token counts)."""
        return self._pending[:-1]

    def transcript(self) -> dict[str, Any]:
        return {"system": prompts.system_message(self.system), "grounding": self.grounding,
                "turns": [{"user": u, "assistant": a} for u, a in self.turns]}
