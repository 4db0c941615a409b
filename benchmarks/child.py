"""Running one side of a benchmark in a fresh process (its own memory, the whole device)."""
from __future__ import annotations

import multiprocessing as mp
import queue as queue_module
from collections.abc import Callable
from typing import Any


def run_in_child(target: Callable[..., None], *args: Any) -> Any:
    """`target(*args, queue)` in a spawned process; what it put on the queue. A child that dies
    without answering (a crash, the OOM killer) ends the benchmark with its exit code."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    while True:
        try:
            result = queue.get(timeout=5)
            break
        except queue_module.Empty:
            if not proc.is_alive():
                raise SystemExit(f"{target.__name__} exited with code {proc.exitcode}") from None
    proc.join()
    return result
