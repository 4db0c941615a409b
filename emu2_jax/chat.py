r"""Interactive multi-turn chat with an Emu2-Chat (or an instruction-tuned Emu v1) checkpoint.

    python -m emu2_jax.chat --checkpoint=$W/chat                      # a `chat`-stage run (latest step)
    python -m emu2_jax.chat --checkpoint=$EMU2_CHAT --system=academic # converted Emu2-Chat, short answers
    python -m emu2_jax.chat --checkpoint=$EMU2_CHAT --num_beams=5 --length_penalty=2.0 --max_new_tokens=64
    python -m emu2_jax.chat --checkpoint=$EMU2_CHAT --grounding       # answers with <phrase>/<object> boxes
    python -m emu2_jax.chat --checkpoint=$W/emu1_chat                 # Emu v1: its image system message
    python -m emu2_jax.chat --checkpoint=$W/chat --sample --temperature=0.7 --top_p=0.9 --seed=1

In the conversation (`user> ` prompt):

    <img:photo.png>What is in this picture?   the image goes where its <img:...> stands
    /image photo.png                          attaches an image to the start of the next message
    /reset   /save chat.json   /help   /quit  (Ctrl-D, or Ctrl-C at the prompt, quits too)

Lines also come from a pipe (`python -m emu2_jax.chat ... < questions.txt`): no prompt then, one
`assistant> ` line per answer.

Configuration. `--system` is a system-message name (Emu2-Chat's `chat`, its default, or `academic`,
the paper's one for short benchmark answers; Emu v1's `emu1_image`, its default, or `emu1_video`;
`none`) or literal text. Emu2-Chat and Emu v1 share the turn template
(`{system} [USER]: {user} [ASSISTANT]: {answer}</s>[USER]: ...`) and differ in their system
messages, so an Emu v1 checkpoint (Causal Transformer connector) gets its own by default.
`--grounding` appends `<grounding>` after each `[ASSISTANT]:`, as Emu2-Chat's template does, and
keeps the answer's box tokens. Decoding is greedy by default; the release's chat example uses beam
search, `--num_beams=5 --length_penalty=2.0`; `--sample` samples with `--temperature`, `--top_k`
and `--top_p`. Answers stop at `</s>` or after `--max_new_tokens`.

The conversation lives in the KV cache (emu2_jax.inference.chat): each turn prefills only its own
tokens, so the model's `llm.max_cache_length` positions bound a conversation; when a turn does not
fit, /reset starts a new one. The first answer, and each new prompt shape, compiles first.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

import jax
import numpy as np
from absl import app, flags, logging
from etils import epath

from emu2_jax import cli
from emu2_jax.data import images as image_lib
from emu2_jax.data import tokenizer as tk
from emu2_jax.inference import chat, checkpoints

PROMPT = "user> "
ANSWER = "assistant> "
IMAGE_REFERENCE = re.compile(r"<img:\s*([^>]*?)\s*>")
COMMANDS = {"/image": ("/image PATH", "attach an image to the start of your next message"),
            "/reset": ("/reset", "forget the conversation (and any queued images)"),
            "/save": ("/save FILE", "write the conversation so far as JSON"),
            "/help": ("/help", "this help"),
            "/quit": ("/quit", "leave (Ctrl-D, or Ctrl-C at the prompt, too)")}
HELP = ("Type a message and press Enter; <img:PATH> in it puts that image there.\n"
        + "\n".join(f"  {usage:<12} {text}" for usage, text in COMMANDS.values()))


# ---------------------------------------------------------------------------------------------
# Parsing a line (pure: no model, no files).

@dataclasses.dataclass(frozen=True)
class Command:
    name: str        # "/reset", ...; as typed when unknown
    argument: str    # the rest of the line, stripped (paths may hold spaces)


def parse_command(line: str) -> Command | None:
    """The command a line starting with `/` gives; None for a message."""
    stripped = line.strip()
    if not stripped.startswith("/"):
        return None
    name, _, argument = stripped.partition(" ")
    return Command(name.lower(), argument.strip())


def image_references(line: str) -> tuple[str, list[str]]:
    """(the line with each `<img:PATH>` replaced by Emu2's `[<IMG_PLH>]`, the paths in order)."""
    paths = IMAGE_REFERENCE.findall(line)
    return IMAGE_REFERENCE.sub(lambda _: tk.IMG_PLACEHOLDER, line).strip(), paths


def unknown_command(name: str) -> str:
    return f"unknown command {name}; commands: " + ", ".join(usage for usage, _ in COMMANDS.values())


# ---------------------------------------------------------------------------------------------
# Flags -> settings, checked before the checkpoint is read.

def check_system(system: str) -> None:
    """A one-word `--system` that is no name is a misspelt name, not a system message."""
    if system not in tk.SYSTEM_MESSAGES and not re.search(r"\s", system.strip()):
        raise SystemExit(f"--system={system}: not a system message name ({', '.join(tk.SYSTEM_MESSAGES)}); "
                         f"literal text has more than one word")


# ---------------------------------------------------------------------------------------------
# The session: one conversation, the lines that drive it.

@dataclasses.dataclass
class Session:
    conversation: chat.Conversation
    checkpoint: str
    seed: int = 0
    out: TextIO = dataclasses.field(default_factory=lambda: sys.stdout)
    err: TextIO = dataclasses.field(default_factory=lambda: sys.stderr)
    interactive: bool = False
    queued: list[tuple[str, np.ndarray]] = dataclasses.field(default_factory=list)   # from /image
    turn_images: list[list[str]] = dataclasses.field(default_factory=list)          # paths per sent turn
    turns_sent: int = 0   # since start: each sampled turn gets its own key

    def note(self, text: str) -> None:
        print(f"[{text}]", file=self.err, flush=True)

    def error(self, text: str) -> None:
        print(f"error: {text}", file=self.err, flush=True)

    def handle(self, line: str) -> bool:
        """Acts on one input line; False when the session should end."""
        command = parse_command(line)
        if command is None:
            if line.strip():
                self.send(line)
            return True
        if command.name == "/quit":
            return False
        if command.name == "/help":
            print(HELP, file=self.out, flush=True)
        elif command.name == "/reset":
            self.conversation.reset()
            self.queued, self.turn_images = [], []
            self.note("conversation reset")
        elif command.name == "/image":
            self.queue_image(command.argument)
        elif command.name == "/save":
            self.save(command.argument)
        else:
            self.error(unknown_command(command.name))
        return True

    def queue_image(self, path: str) -> None:
        if not path:
            self.error("/image needs a file: /image photo.png")
            return
        try:
            self.queued.append((path, image_lib.read_image_file(path, f"/image {path}")))
        except ValueError as e:
            self.error(str(e))
            return
        self.note(f"{path} goes first in your next message ({len(self.queued)} queued)")

    def send(self, line: str) -> None:
        """One turn: the images the line names (all readable, else nothing is sent), the answer."""
        text, paths = image_references(line)
        try:
            pixels = [image_lib.read_image_file(p, f"<img:{p}>") for p in paths]
        except ValueError as e:
            self.error(f"{e}; the message was not sent")
            return
        text = tk.IMG_PLACEHOLDER * len(self.queued) + text
        names, pixels = [p for p, _ in self.queued] + paths, [x for _, x in self.queued] + pixels
        talk = self.conversation
        used = talk.used
        rng = jax.random.fold_in(jax.random.key(self.seed), self.turns_sent)
        started = time.perf_counter()
        try:
            if self.interactive:  # until the answer replaces it: the first one compiles
                print(ANSWER + "...", end="", file=self.out, flush=True)
            answer = talk.say(text, pixels, rng=rng)
        except ValueError as e:  # the conversation is full, or placeholders typed by hand
            self.end_pending_line()
            self.error(str(e) + (f" ({len(self.queued)} queued images kept)" if self.queued else ""))
            return
        except KeyboardInterrupt:
            self.end_pending_line()
            self.note("interrupted: the message was not sent")
            return
        seconds = time.perf_counter() - started
        self.end_pending_line()
        self.queued, self.turns_sent = [], self.turns_sent + 1
        self.turn_images.append(names)
        print(ANSWER + answer, file=self.out, flush=True)
        generated = len(talk.last_answer_ids)
        self.note(f"cache {talk.used}/{talk.capacity} positions; this turn {talk.used - used} prefilled + "
                  f"{generated} generated in {seconds:.1f} s, {generated / max(seconds, 1e-9):.1f} tok/s")

    def end_pending_line(self) -> None:
        if self.interactive:   # wipe the "assistant> ..." placeholder
            print("\r\033[K", end="", file=self.out, flush=True)

    def save(self, path: str) -> None:
        if not path:
            self.error("/save needs a file name: /save chat.json")
            return
        talk = self.conversation
        record = {"checkpoint": self.checkpoint, **talk.transcript(), "generation": talk.generation,
                  "seed": self.seed}
        record["turns"] = [{**turn, "images": names} for turn, names in zip(record["turns"], self.turn_images)]
        try:
            target = epath.Path(path).expanduser()
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        except (OSError, ValueError) as e:
            self.error(f"/save {path}: cannot write it ({e})")
            return
        self.note(f"saved {len(record['turns'])} turns to {path}")


def run(session: Session) -> None:
    """Reads lines until /quit, end of input, or Ctrl-C at the prompt."""
    if session.interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
    while True:
        try:
            line = input(PROMPT if session.interactive else "")
        except (EOFError, KeyboardInterrupt):
            if session.interactive:
                print(file=session.out, flush=True)
            return
        try:
            if not session.handle(line):
                return
        except KeyboardInterrupt:  # Ctrl-C during a command: back to the prompt
            session.end_pending_line()
            session.note("interrupted")


def start(checkpoint: str, *, tokenizer: str | None, system: str | None, grounding: bool, seed: int,
          generation: dict[str, Any], interactive: bool) -> Session:
    """Loads the checkpoint and opens a conversation (SystemExit naming the flag on bad input)."""
    if system is not None:
        check_system(system)
    logging.info("Loading %s ...", checkpoint)
    loaded = checkpoints.load_llm(checkpoint, tokenizer=tokenizer)
    emu1 = loaded.model.config.connector == "causal_transformer"
    if grounding and emu1:
        raise SystemExit(f"--grounding: {checkpoint} is an Emu v1 model, which has no grounding mode (Emu2-Chat's)")
    system = system or ("emu1_image" if emu1 else "chat")
    capacity = loaded.model.config.llm.max_cache_length
    if generation["max_new_tokens"] >= capacity:
        raise SystemExit(f"--max_new_tokens={generation['max_new_tokens']}: leaves no room for a message in the "
                         f"model's {capacity} cache positions")
    talk = chat.Conversation(loaded.model, loaded.params, loaded.tokenizer, system=system, grounding=grounding,
                             generation={**generation, "stop_ids": (loaded.tokenizer.eos_id,)})
    logging.info("%s model from %s; system message %r; grounding %s; %d cache positions. The first answer "
                 "compiles first. /help for commands.", "Emu v1" if emu1 else "Emu2", loaded.path,
                 system if system in tk.SYSTEM_MESSAGES else "(literal)", "on" if grounding else "off", capacity)
    return Session(talk, loaded.path, seed=seed, interactive=interactive)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(cli.OwnInfoOnly())
    f = flags.FLAGS
    generation = cli.decoding_options(**{name: f[name].value for name in cli.DECODING_FLAGS})
    try:
        session = start(f.checkpoint, tokenizer=f.tokenizer, system=f.system, grounding=f.grounding, seed=f.seed,
                        generation=generation, interactive=sys.stdin.isatty())
    except KeyboardInterrupt:
        raise SystemExit("interrupted while loading the checkpoint") from None
    run(session)


if __name__ == "__main__":  # flags only for the command, so the module imports next to others' flags
    flags.DEFINE_string("checkpoint", None, "An LLM-stage training workdir (chat, emu1_chat, ...), its checkpoints/ "
                        "folder or a step folder, or a converted Emu2-Chat.")
    flags.DEFINE_string("tokenizer", None, "sentencepiece tokenizer.model; default: the checkpoint's.")
    flags.DEFINE_string("system", None, "System message: chat | academic (Emu2-Chat), emu1_image | emu1_video "
                        "(Emu v1), none, or literal text. Default: chat, emu1_image for an Emu v1 model.")
    flags.DEFINE_boolean("grounding", False, "Grounding mode: <grounding> after each [ASSISTANT]:.")
    cli.define_decoding_flags(max_new_tokens=256)  # the release's chat example: --num_beams=5 --length_penalty=2
    flags.DEFINE_integer("seed", 0, "Seed of sampling (each turn folds in its number).")
    flags.mark_flags_as_required(["checkpoint"])
    app.run(main)
