"""engine/threads.py: the engine thread owns torch's intra-op threads; helpers use one."""

from __future__ import annotations

import threading

import pytest
import torch

from loraplex.engine.threads import (cgroup_cpu_quota, cpu_count, default_threads,
                                     helper_executor, run_in_fresh_thread)


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


def test_default_threads_honour_omp_num_threads(monkeypatch):
    """Replicas sharing a host set OMP_NUM_THREADS (deploy/local_cluster.py): more spinning
    OpenMP threads than cores slowed a 3-replica cluster on 2 cores about 10x."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert default_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "not a number")
    assert default_threads() == cpu_count()
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert default_threads() == cpu_count()


@pytest.mark.parametrize("files, quota", [
    ({"cpu.max": "250000 100000\n"}, 2.5),  # cgroup v2, a limit of 2.5 CPUs
    ({"cpu.max": "max 100000\n"}, None),  # v2, unlimited
    ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4.0),  # v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),  # no cgroup files
])
def test_cgroup_cpu_quota(tmp_path, files, quota):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_quota(str(tmp_path)) == quota


def test_a_threads_count_survives_torchs_lazy_setup():
    """torch sets up a thread's count at its first parallel op, to the count some thread
    set last: a helper starting in between must not undo the engine thread's count."""
    def engine_thread():
        with helper_executor("test-helper") as pool:
            pool.submit(lambda: None).result()  # sets 1 on its own thread
        a = torch.randn(64, 64)
        a @ a  # this thread's first parallel op
        return torch.get_num_threads()

    assert run_in_fresh_thread(engine_thread, threads=2, name="test-fresh") == 2


def test_step_loop_keeps_its_threads_after_an_adapter_load(tiny_models, adapter_root):
    """The first request names an adapter on disk: the engine's loader thread starts (and
    sets one thread on itself) before the step loop's first forward pass."""
    from engine_helpers import build_engine, greedy, run_all

    from loraplex.engine.request import GenerationRequest

    engine = build_engine(tiny_models["llama"], adapter_root / "llama", threads=2)
    seen = []
    run = engine.runner.run
    engine.runner.run = lambda batch: (seen.append(torch.get_num_threads()), run(batch))[1]
    try:
        [out] = run_all(engine, [GenerationRequest([5, 6, 7], greedy(3), adapter="r4_attn")])
        assert len(out.token_ids) == 3
    finally:
        engine.stop()
    assert seen and set(seen) == {2}
