"""Run a function on W local gloo processes and collect what each returns (tests, demos)."""

from __future__ import annotations

import queue
import socket
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["free_port", "run_gloo"]


def free_port() -> int:
    """A TCP port that was free a moment ago (bind to port 0 and let the OS choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results) -> None:
    torch.set_num_threads(1)  # W processes share the machine's cores
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
        )
        results.put((rank, True, fn(rank, world_size, *args)))
    except BaseException:  # report every failure to the parent instead of dying silently
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_gloo(fn: Callable, world_size: int, *args: Any, timeout: float = 120.0) -> list[Any]:
    """``[fn(rank, world_size, *args) for rank in range(world_size)]``, each in its own process.

    The processes form one gloo group (the default process group). ``fn`` must be importable
    (spawned processes unpickle it by name) and return something picklable. A worker's exception
    is raised here as ``RuntimeError`` with its traceback; a run longer than ``timeout`` seconds
    (e.g. a hang in a collective) kills the workers and raises ``TimeoutError``.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(rank, world_size, port, fn, args, results), daemon=True)
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout
    outputs: dict[int, Any] = {}
    try:
        while len(outputs) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"gloo workers did not finish in {timeout:.0f} s (ranks done: {sorted(outputs)})"
                )
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [
                    r
                    for r, p in enumerate(procs)
                    if p.exitcode not in (None, 0) and r not in outputs
                ]
                if dead:
                    raise RuntimeError(f"gloo worker(s) {dead} exited without a result") from None
                continue
            if not ok:
                raise RuntimeError(f"gloo worker {rank} of {world_size} failed:\n{value}")
            outputs[rank] = value
    finally:
        for proc in procs:
            proc.join(timeout=5 if len(outputs) == world_size else 0)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return [outputs[rank] for rank in range(world_size)]
