"""engine/threads.py: the engine thread owns torch's intra-op threads; helpers use one."""

from __future__ import annotations

import threading

import pytest
import torch

from loraplex.engine.threads import cpu_count, helper_executor, run_in_fresh_thread


def test_helper_threads_run_torch_on_one_thread():
    before = torch.get_num_threads()
    with helper_executor("test-helper", max_workers=2) as pool:
        assert pool.submit(torch.get_num_threads).result() == 1
        assert pool.submit(lambda: threading.current_thread().name).result().startswith("test-helper")
    assert torch.get_num_threads() == before  # the caller's own setting is untouched


def test_fresh_thread_gets_the_requested_threads_and_is_gone_after():
    seen = []

    def work():
        seen.append(threading.current_thread())
        return torch.get_num_threads()

    assert run_in_fresh_thread(work, threads=2, name="test-fresh") == 2
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()


def test_fresh_thread_reraises_in_the_caller():
    def boom():
        raise ValueError("bad model folder")

    with pytest.raises(ValueError, match="bad model folder"):
        run_in_fresh_thread(boom, threads=1, name="test-fresh")


def test_cpu_count_is_what_the_process_may_use():
    assert 1 <= cpu_count() <= (torch.multiprocessing.cpu_count() or 1)
