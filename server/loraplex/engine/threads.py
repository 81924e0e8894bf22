"""Torch's CPU threads belong to the engine thread.

On CPU, torch runs its intra-op parallel regions on libgomp. Every thread that starts one
gets a pool of OpenMP workers of its own, alive as long as that thread. Once the workers
of all pools outnumber the CPUs, libgomp all but stops spin-waiting between regions, and
each of the hundreds of small matmuls in a decode step then pays a futex wake-up.
Measured on 2 cores: a helper thread that had run one 2-thread matmul made the step loop
1.6x slower with 32 adapters in the batch.

So the engine thread runs torch on `threads` intra-op threads; model loading runs in a
short-lived thread (its pool goes when it exits); every other thread that touches torch
(adapter loads, merges, the event loop's helpers) runs it on one thread.

A program that embeds the engine must do the same: torch work with more than one thread
on its main thread (building a model, one matmul) leaves a pool there for as long as the
program runs. `run_in_fresh_thread` is the way to do such work (bench/bench.py does).
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def default_threads() -> int:
    """The step loop's threads when none are configured: OMP_NUM_THREADS when set (as torch
    itself would), else every CPU this process may use."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(env) if env.isdigit() and int(env) > 0 else cpu_count()


def cpu_count() -> int:
    """CPUs this process may run on: its affinity, capped by a cgroup CPU quota (a
    container's CPU limit; more spinning OpenMP threads than that only fight)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return max(1, min(cpus, math.ceil(quota))) if quota else cpus


def cgroup_cpu_quota(root: str = "/sys/fs/cgroup") -> float | None:
    """CPUs' worth of time the cgroup may use per period (cgroup v2 `cpu.max`, or v1
    `cpu.cfs_quota_us` / `cpu.cfs_period_us`); None when unlimited or unknown."""
    try:
        quota, period = Path(root, "cpu.max").read_text().split()[:2]  # "max 100000" | "400000 100000"
    except (OSError, ValueError):
        try:
            quota = Path(root, "cpu", "cpu.cfs_quota_us").read_text().strip()  # "-1" = unlimited
            period = Path(root, "cpu", "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        q, p = int(quota), int(period)
    except ValueError:  # "max"
        return None
    return q / p if q > 0 and p > 0 else None


def use_threads(n: int) -> None:
    """Run torch on `n` intra-op threads on the calling thread, for good.

    torch sets up each thread's count lazily, at its first parallel op (or
    get_num_threads), to the count that some thread set last. A thread that only called
    set_num_threads(2) would have it undone by a helper that set 1 in the meantime (the
    step loop then ran on one thread; the bench's baselines did, after the engine
    stopped). Setting up first, then setting, keeps the count."""
    torch.get_num_threads()
    torch.set_num_threads(n)


def helper_executor(name: str, max_workers: int | None = None) -> ThreadPoolExecutor:
    """A thread pool whose threads run torch single-threaded."""
    return ThreadPoolExecutor(max_workers, thread_name_prefix=name,
                              initializer=use_threads, initargs=(1,))


def run_in_fresh_thread(fn: Callable[[], T], threads: int, name: str) -> T:
    """fn() on a new thread with `threads` intra-op threads; blocks until it returns. The
    thread's OpenMP pool exits with it, so the calling thread keeps none."""
    result: list = []

    def target():
        use_threads(threads)
        try:
            result.append((True, fn()))
        except BaseException as exc:  # noqa: BLE001  (re-raised in the caller)
            result.append((False, exc))

    thread = threading.Thread(target=target, name=name)
    thread.start()
    thread.join()
    ok, value = result[0]
    if not ok:
        raise value
    return value
