"""`python -m emu2_jax.chat` as a terminal program: driven through a pseudo-terminal on a tiny
chat-stage checkpoint, as a user types at it."""
import json
import os
import re
import select
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import chat as chat_config
from emu2_jax import chat
from emu2_jax import cli as commands
from emu2_jax.data import tokenizer as tk
from emu2_jax.inference import chat as inference_chat
from emu2_jax.inference import checkpoints
from tests import cli

IMAGE = os.path.join(cli.REPO, "emu2_jax", "data", "embedded", "images", "coins.png")
FIRST_ANSWER_S = 300   # loading, then compiling the first turn: seconds here, minutes on a loaded machine
STEP_S = 120
# The child takes the pty as its controlling terminal (a new session, then TIOCSCTTY on stdin), so
# that Ctrl-C typed at it is a SIGINT, as in a terminal.
WITH_TERMINAL = ("import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
                 "os.execv(sys.executable, [sys.executable] + sys.argv[1:])")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return cli.write_initial_checkpoint(tmp_path_factory.mktemp("chat_run"), chat_config.get_config("tiny"))


class Terminal:
    """The command on a pseudo-terminal: `expect` reads until a text shows up, `type` sends a line."""

    def __init__(self, *args: str):
        self.master, slave = os.openpty()
        self.process = subprocess.Popen(
            [sys.executable, "-c", WITH_TERMINAL, "-m", "emu2_jax.chat", *args], cwd=cli.REPO, env=cli.ENV,
            stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
        os.close(slave)
        self.output, self.seen = "", 0

    def expect(self, text: str, timeout: float = STEP_S) -> str:
        """The output since the last `expect`, up to and including `text`."""
        deadline = time.monotonic() + timeout
        while text not in self.output[self.seen:]:
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(left):
                ended = "" if self.process.poll() is None else f" (exited with {self.process.returncode})"
                raise AssertionError(f"no {text!r} within {timeout} s{ended}; output so far:\n{self.output[-3000:]}")
        end = self.output.index(text, self.seen) + len(text)
        chunk, self.seen = self.output[self.seen:end], end
        return chunk

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], min(timeout, 1.0))
        if not ready:
            return self.process.poll() is None
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: the child closed the terminal
            return False
        self.output += data.decode("utf-8", errors="replace")
        return bool(data)

    def type(self, text: str, end: str = "\n") -> None:
        os.write(self.master, (text + end).encode())

    def exit_code(self, timeout: float = STEP_S) -> int | None:
        """The exit status, or None if the program still runs after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            self._read(0.2)
        return self.process.poll()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.master)


@pytest.fixture
def terminal():
    started = []

    def start(*args: str) -> Terminal:
        started.append(Terminal(*args))
        return started[-1]

    yield start
    for t in started:
        t.close()


def answer_lines(chunk: str) -> list[str]:
    """The final `assistant> ` lines of `chunk` (the `assistant> ...` placeholder is overwritten)."""
    lines = [re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", part) for part in re.split(r"[\r\n]+", chunk)]
    return [line for line in lines if line.startswith(chat.ANSWER) and line != chat.ANSWER + "..."]


def cache_use(chunk: str) -> tuple[int, int]:
    """(positions used, positions this turn prefilled) from the turn's cache line."""
    match = re.search(r"\[cache (\d+)/\d+ positions; this turn (\d+) prefilled \+ \d+ generated in [\d.]+ s", chunk)
    assert match, chunk
    return int(match.group(1)), int(match.group(2))


def test_conversation_in_a_terminal(checkpoint, terminal, tmp_path):
    term = terminal(f"--checkpoint={checkpoint}", "--max_new_tokens=4")
    term.expect(chat.PROMPT, FIRST_ANSWER_S)
    term.type(f"<img:{IMAGE}> What is in the picture?")
    turn = term.expect("[cache ", FIRST_ANSWER_S) + term.expect(chat.PROMPT)
    assert answer_lines(turn), turn
    used_1, prefilled_1 = cache_use(turn)
    assert used_1 == prefilled_1

    term.type("<img:missing.png> and this one?")
    error = term.expect(chat.PROMPT)
    assert "error: <img:missing.png>: cannot read it" in error and "the message was not sent" in error, error
    term.type("/nope")
    assert "unknown command /nope; commands: /image PATH, /reset, /save FILE, /help, /quit" in term.expect(chat.PROMPT)

    term.type("And the colours?")
    turn = term.expect("[cache ") + term.expect(chat.PROMPT)
    assert answer_lines(turn), turn
    used_2, prefilled_2 = cache_use(turn)
    # The second turn prefilled only its own tokens (the previous answer and this message) on top.
    assert used_2 == used_1 + prefilled_2 and prefilled_2 < prefilled_1

    saved = tmp_path / "out.json"
    term.type(f"/save {saved}")
    assert "saved 2 turns" in term.expect(chat.PROMPT)
    record = json.loads(saved.read_text())
    assert [t["user"] for t in record["turns"]] == [f"{tk.IMG_PLACEHOLDER} What is in the picture?", "And the colours?"]
    assert [t["images"] for t in record["turns"]] == [[IMAGE], []]
    assert record["checkpoint"] == str(checkpoint) and record["system"] == tk.SYSTEM_CHAT
    assert record["generation"]["max_new_tokens"] == 4 and not record["grounding"]

    term.type("/reset")
    assert "conversation reset" in term.expect(chat.PROMPT)
    term.type("/save")
    assert "/save needs a file name" in term.expect(chat.PROMPT)
    term.type("/quit")
    assert term.exit_code() == 0, term.output[-3000:]


def test_ctrl_d_and_ctrl_c_at_the_prompt_leave_cleanly(checkpoint, terminal):
    args = f"--checkpoint={checkpoint}", "--max_new_tokens=4"  # the default 256 fills the tiny model's cache
    first, second = terminal(*args), terminal(*args)
    first.expect(chat.PROMPT, FIRST_ANSWER_S)
    first.type("/help")
    assert "/image PATH" in first.expect(chat.PROMPT)
    first.type("\x04", end="")   # Ctrl-D: end of input
    second.expect(chat.PROMPT, FIRST_ANSWER_S)
    assert first.exit_code() == 0, first.output[-3000:]
    # Ctrl-C: SIGINT from the terminal. A SIGINT landing after the prompt is printed but before
    # CPython's readline enters select() is only seen at the next key (a race in CPython, seen once
    # on a loaded machine), so press it again as a user would, a few seconds apart.
    for _ in range(5):
        second.type("\x03", end="")
        if second.exit_code(timeout=5) is not None:
            break
    assert second.exit_code() == 0, second.output[-3000:]
    assert "Traceback" not in first.output + second.output


def test_bad_flags_are_one_line_errors_before_loading(tmp_path):
    base = [sys.executable, "-m", "emu2_jax.chat"]
    result = cli.run(base)  # absl's own message, then its pointer to --helpshort
    assert result.returncode != 0 and "--checkpoint" in cli.message_lines(result.stderr)[0], result.stderr
    for flag, expected in [(f"--checkpoint={tmp_path / 'nowhere'}", "no such file or directory"),
                           ("--system=academc", "--system=academc: not a system message name"),
                           ("--temperature=0.7", "--temperature=0.7: takes effect only with --sample")]:
        args = [flag] if flag.startswith("--checkpoint") else [f"--checkpoint={tmp_path / 'nowhere'}", flag]
        result = cli.run(base + args)
        lines = cli.message_lines(result.stderr)
        assert result.returncode != 0 and len(lines) == 1 and expected in lines[0], result.stderr


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return checkpoints.load_llm(checkpoint)


def test_failed_turn_leaves_the_conversation_as_it_was(loaded, monkeypatch):
    """An error (or Ctrl-C) while answering keeps nothing of the message in the cache."""
    talk = inference_chat.Conversation(loaded.model, loaded.params, loaded.tokenizer, generation={"max_new_tokens": 2})

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(inference_chat.text, "continue_text", interrupted)
        with pytest.raises(KeyboardInterrupt):
            talk.say("Hello there")
    assert talk.used == 0 and talk.turns == [] and talk.last_answer_ids == []
    talk.say("Hello again")
    assert talk.used > 0 and [u for u, _ in talk.turns] == ["Hello again"]


def test_grounding_answers_keep_their_boxes(loaded, monkeypatch):
    tokenizer = loaded.tokenizer
    ids = tokenizer.encode(f"{tk.PHRASE}a coin{tk.PHRASE_END}{tk.OBJECT}{tk.patch_index_token(3)}{tk.OBJECT_END}",
                           add_bos=False)
    monkeypatch.setattr(inference_chat.text, "continue_text",
                        lambda *a, **k: inference_chat.text.Generated(np.asarray([ids]), np.asarray([len(ids)])))
    for grounding, expected in [(True, "<phrase>a coin</phrase><object><patch_index_0003></object>"),
                                (False, "a coin")]:
        talk = inference_chat.Conversation(loaded.model, loaded.params, tokenizer, grounding=grounding,
                                           generation={"max_new_tokens": 8})
        assert talk.say("Where is the coin?") == expected
        assert talk.last_answer_ids == ids


def test_line_parsing():
    text, paths = chat.image_references("<img:a.png>What differs from <img: dir/b c.jpg >? ")
    assert text == f"{tk.IMG_PLACEHOLDER}What differs from {tk.IMG_PLACEHOLDER}?" and paths == ["a.png", "dir/b c.jpg"]
    assert chat.image_references("no images <img here") == ("no images <img here", [])
    assert chat.parse_command("hello /reset") is None
    assert chat.parse_command("  /SAVE  my chat.json ") == chat.Command("/save", "my chat.json")
    assert chat.parse_command("/reset") == chat.Command("/reset", "")
    assert "/image PATH" in chat.unknown_command("/x")


@pytest.mark.parametrize("flags, expected", [
    (dict(max_new_tokens=0), "--max_new_tokens=0: must be >= 1"),
    (dict(sample=True, num_beams=5), "beam sampling is not supported"),
    (dict(top_p=0.9), "--top_p=0.9: takes effect only with --sample"),
    (dict(sample=True, top_p=1.5), "--top_p=1.5: must be in (0, 1]"),
    (dict(length_penalty=2.0), "takes effect only with --num_beams > 1"),
])
def test_generation_flags_are_checked(flags, expected):
    settings = dict(max_new_tokens=8, num_beams=1, length_penalty=1.0, sample=False, temperature=1.0, top_k=0,
                    top_p=1.0)
    with pytest.raises(SystemExit, match=re.escape(expected)):
        commands.decoding_options(**{**settings, **flags})
    release = commands.decoding_options(**{**settings, "num_beams": 5, "length_penalty": 2.0})
    assert release == {"max_new_tokens": 8, "num_beams": 5, "length_penalty": 2.0}


def test_interrupt_while_answering_keeps_the_conversation(checkpoint, terminal):
    """Ctrl-C while the first answer compiles drops that message: the next one opens the conversation."""
    term = terminal(f"--checkpoint={checkpoint}", "--max_new_tokens=4")
    term.expect(chat.PROMPT, FIRST_ANSWER_S)
    term.type("Hello there")
    term.expect(chat.ANSWER + "...")
    os.killpg(term.process.pid, signal.SIGINT)
    chunk = term.expect(chat.PROMPT, FIRST_ANSWER_S)
    assert "interrupted: the message was not sent" in chunk, chunk
    term.type("Hello again")
    turn = term.expect("[cache ", FIRST_ANSWER_S) + term.expect(chat.PROMPT)
    used, prefilled = cache_use(turn)
    assert answer_lines(turn) and used == prefilled  # nothing of the dropped message is in the cache
    term.type("/quit")
    assert term.exit_code() == 0, term.output[-3000:]
