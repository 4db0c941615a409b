"""What the commands share: flag parsing with one-line errors for `--config.` overrides, the
console log filter, multi-process detection and the start-up SIGTERM handler."""
from __future__ import annotations

import logging as pylogging
import os
import re
import signal
from collections.abc import Sequence
from typing import Any

from absl import app, flags, logging


def multi_process_environment() -> bool:
    """Whether the environment describes a multi-process job."""
    env = os.environ
    hosts = env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES") or ""
    return bool(
        env.get("JAX_COORDINATOR_ADDRESS") or env.get("MEGASCALE_COORDINATOR_ADDRESS")
        or len([h for h in hosts.split(",") if h]) > 1
        or int(env.get("SLURM_NTASKS", "1")) > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)


class OwnInfoOnly(pylogging.Filter):
    """Keeps library INFO chatter (Orbax logs every save step by step) off the console."""
    package_dir = os.path.dirname(os.path.abspath(__file__)) + os.sep

    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or os.path.abspath(record.pathname).startswith(self.package_dir)


def _config_overrides(argv: Sequence[str]) -> list[tuple[str, str]]:
    """(field, argument) of each `--config.<field>[=value]` in `argv`."""
    found = []
    for arg in argv:
        match = re.match(r"--?(?:no)?config\.([\w.]+)(?:=|$)", arg)
        if match:
            found.append((match.group(1), arg))
    return found


def repeated_overrides(argv: Sequence[str]) -> list[str]:
    """One line per `--config.<field>` given more than once (absl would silently keep the last)."""
    by_field: dict[str, list[str]] = {}
    for field, arg in _config_overrides(argv):
        by_field.setdefault(field, []).append(arg.partition("=")[2])
    return [f"--config.{field} is given {len(values)} times ({', '.join(values)}): give each field once; an "
            f"unquoted shell pattern such as --config.{field}=s-{{000..002}}.tar expands into one argument per "
            f"name, so quote it: '--config.{field}=s-{{000..002}}.tar'"
            for field, values in by_field.items() if len(values) > 1]


def unknown_field_message(error: BaseException, argv: Sequence[str]) -> str:
    """One line for ml_collections' error on an unknown field, an AttributeError(KeyError("'name'"
    [+ '\\nDid you mean "total_steps" instead of ...?'])) naming only the last component: the
    override it comes from, and the hint."""
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    name, _, hint = str(error.args[0] if error.args else error).strip("'").partition("'\n")
    field = next((f for f, _ in _config_overrides(argv) if name in f.split(".")), name)
    config_file = next((a.partition("=")[2] for a in argv if re.match(r"--?config=", a)), "the config")
    return f"--config.{field}: no such field in {config_file}" + (f" ({hint.strip()})" if hint else "")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (which reports its own errors in a line), with one-line errors for repeated
    and unknown `--config.` fields (else a silent last-one-wins, and an ml_collections traceback)."""
    repeated = repeated_overrides(argv[1:])
    if repeated:
        raise SystemExit("\n".join(repeated))
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as e:  # ml_collections: a --config.<field> the config does not have
        raise SystemExit(unknown_field_message(e, argv[1:])) from None


def exit_on_sigterm_during_start_up(signum: int, frame: Any) -> None:
    """Until the training loop's own handler takes over no step has run since the last checkpoint,
    so there is nothing to save. The exit status is 143 (128 + SIGTERM, what the default action
    reports to a shell) rather than 0: the run did not finish, and job runners that restart failed
    jobs must not take it for done."""
    logging.warning("SIGTERM during start-up: nothing to save, exiting (status 143).")
    raise SystemExit(128 + signal.SIGTERM)


def define_decoding_flags(max_new_tokens: int) -> None:
    """The text-decoding flags that generate, chat and evaluate share (read with `decoding_options`)."""
    flags.DEFINE_integer("max_new_tokens", max_new_tokens, "New tokens per answer at most.")
    flags.DEFINE_integer("num_beams", 1, "Beam search with this many beams (1: greedy, or sampling with --sample).")
    flags.DEFINE_float("length_penalty", 1.0, "Beam search: a hypothesis scores log-prob sum / length ** this.")
    flags.DEFINE_bool("sample", False, "Sample instead of greedy or beam decoding.")
    flags.DEFINE_float("temperature", 1.0, "Sampling temperature (with --sample).")
    flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens; 0: all (with --sample).")
    flags.DEFINE_float("top_p", 1.0, "Sample among the likeliest tokens holding this much probability (with --sample).")


DECODING_FLAGS = ("max_new_tokens", "num_beams", "length_penalty", "sample", "temperature", "top_k", "top_p")


def decoding_options(*, max_new_tokens: int, num_beams: int, length_penalty: float, sample: bool, temperature: float,
                     top_k: int, top_p: float) -> dict[str, Any]:
    """The `inference.text.generate_text` keywords of the `define_decoding_flags` flags (pass
    `**{name: FLAGS[name].value for name in DECODING_FLAGS}`), or SystemExit naming the flag that is
    wrong, before any checkpoint is read."""
    if max_new_tokens < 1:
        raise SystemExit(f"--max_new_tokens={max_new_tokens}: must be >= 1")
    if num_beams < 1:
        raise SystemExit(f"--num_beams={num_beams}: must be >= 1")
    if sample and num_beams > 1:
        raise SystemExit(f"--sample with --num_beams={num_beams}: beam sampling is not supported; give one")
    if not sample:
        for name, value, default in (("temperature", temperature, 1.0), ("top_k", top_k, 0), ("top_p", top_p, 1.0)):
            if value != default:
                raise SystemExit(f"--{name}={value}: takes effect only with --sample")
    if temperature <= 0:
        raise SystemExit(f"--temperature={temperature}: must be > 0")
    if top_k < 0:
        raise SystemExit(f"--top_k={top_k}: must be >= 0 (0: no top-k cut)")
    if not 0 < top_p <= 1:
        raise SystemExit(f"--top_p={top_p}: must be in (0, 1]")
    if length_penalty != 1.0 and num_beams == 1:
        raise SystemExit(f"--length_penalty={length_penalty}: takes effect only with --num_beams > 1")
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "num_beams": num_beams}
    if num_beams > 1:
        options["length_penalty"] = length_penalty
    if sample:
        options.update(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    return options
