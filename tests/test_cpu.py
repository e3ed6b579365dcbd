"""Thread fitting on a busy CPU (pact_fast.cpu)."""
import os

import pytest
import torch

from pact_fast import cpu


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield threads
    torch.set_num_threads(threads)


@pytest.mark.parametrize("idle,expected", [(0.2, 1), (1.4, 1), (1.6, 2), (64.0, 2)])
def test_fit_threads_takes_the_idle_cores_at_least_one_at_most_the_default(monkeypatch, restore_threads, idle,
                                                                          expected):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu, "idle_cores", lambda interval=0.25: idle)
    monkeypatch.setattr(cpu, "_default_threads", 2)  # torch's default on a 2-core machine
    logs = []
    assert cpu.fit_threads(0, log=logs.append) == expected == torch.get_num_threads()
    assert bool(logs) == (expected < 2)
    if logs:
        assert f"{idle:.1f} of" in logs[0] and "torch uses 1 thread instead of 2" in logs[0]


def test_an_explicit_count_or_omp_num_threads_wins(monkeypatch, restore_threads):
    monkeypatch.setattr(cpu, "idle_cores", lambda interval=0.25: 0.0)
    torch.set_num_threads(2)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cpu.fit_threads(0) == 2 == torch.get_num_threads()
    assert cpu.fit_threads(1) == 1 == torch.get_num_threads()


def test_more_threads_than_four_per_core_are_refused(monkeypatch, restore_threads):
    """train.threads=100000 crashed the process in torch's thread pool (exit 139); 1000 had it killed."""
    from pact_fast.config import ConfigError

    monkeypatch.setattr(cpu.os, "cpu_count", lambda: 2)
    assert cpu.fit_threads(8) == 8 == torch.get_num_threads()  # bench/shared_cores.py's most: 4 per core
    with pytest.raises(ConfigError, match=r"train.threads=9: more than 4 per core of this machine's 2"):
        cpu.fit_threads(9)


def test_idle_cores_reads_a_fraction_of_the_machine():
    idle = cpu.idle_cores(interval=0.05)
    assert idle is None or 0.0 <= idle <= (os.cpu_count() or 1) + 1e-9


def test_a_second_run_in_one_process_fits_from_torchs_default_not_the_first_runs_count(monkeypatch, restore_threads):
    """`compare` trains its arms in one process: an arm that started beside a busy process set one thread, and each
    later arm took that one thread as torch's default, on a quiet machine too."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu, "_default_threads", 2)
    monkeypatch.setattr(cpu, "idle_cores", lambda interval=0.25: 0.3)
    assert cpu.fit_threads(0) == 1 == torch.get_num_threads()
    monkeypatch.setattr(cpu, "idle_cores", lambda interval=0.25: 2.0)
    assert cpu.fit_threads(0) == 2 == torch.get_num_threads()


def _fake_machine(monkeypatch, cores, samples):
    """/proc/stat and this process's CPU time as ``samples``: (idle, total, own) seconds, one per read."""
    reads = iter(samples)
    current = {}

    def times():
        current["sample"] = next(reads)
        return current["sample"][:2]

    monkeypatch.setattr(cpu.os, "cpu_count", lambda: cores)
    monkeypatch.setattr(cpu, "_cpu_times", times)
    monkeypatch.setattr(cpu.os, "times", lambda: os.times_result((current["sample"][2] / 2, 0.0, 0.0,
                                                                   current["sample"][2] / 2, 0.0)))


@pytest.mark.parametrize("own,others,expected", [
    (2.0, 0.0, 2.0),  # this process alone, both cores busy: both free of others
    (1.0, 1.0, 1.0),  # one busy process beside it
    (0.5, 1.5, 0.5),
    (0.0, 0.0, 2.0),  # an idle machine
])
def test_free_cores_measures_the_other_processes(monkeypatch, restore_threads, own, others, expected):
    # 4 s of wall time on 2 cores = 8 core-seconds between the reads; busy = own + others (cores' worth) * 4 s
    busy = (own + others) * 4
    _fake_machine(monkeypatch, 2, [(100.0, 1000.0, 50.0), (100.0 + 8 - busy, 1008.0, 50.0 + own * 4)])
    torch.set_num_threads(2)
    assert cpu.FreeCores().free() == pytest.approx(expected)


def test_free_cores_refits_the_threads_past_the_hysteresis_within_one_and_the_default(monkeypatch, restore_threads):
    """A run started beside a busy process kept its one thread to its end, 1.4x slower once that process ended."""
    monkeypatch.setattr(cpu, "_default_threads", 2)
    torch.set_num_threads(1)
    free = iter([1.7, 1.8, 1.8, 1.3, 1.2, 0.1, None, 8.0])
    follower = cpu.FreeCores()
    monkeypatch.setattr(follower, "free", lambda: next(free))
    said = [follower.step() for _ in range(8)]
    # 1.7 is within the hysteresis of 1 thread; 1.8 is past it: 2; 1.3 is within it of 2; 1.2 is past it: 1;
    # 0.1 is still 1 (at least one); no reading changes nothing; 8 free cores is torch's default, 2
    assert [s is not None for s in said] == [False, True, False, False, True, False, False, True]
    assert "1.8 of" in said[1] and "torch now uses 2 threads (was 1;" in said[1]
    assert "torch now uses 1 thread (was 2;" in said[4]
    assert follower.threads == 2 == torch.get_num_threads()


def test_on_many_cores_the_hysteresis_is_a_tenth_of_the_default(monkeypatch, restore_threads):
    """Sixteen cores and a load that wavers by a core: the count followed each wave, a line a step."""
    monkeypatch.setattr(cpu, "_default_threads", 16)
    torch.set_num_threads(13)
    free = iter([12.0, 14.5, 11.3])
    follower = cpu.FreeCores()
    monkeypatch.setattr(follower, "free", lambda: next(free))
    assert [follower.step() is not None for _ in range(3)] == [False, False, True]
    assert follower.threads == 11 == torch.get_num_threads()


@pytest.mark.parametrize("omp", [None, "2"])
def test_the_trainer_refits_its_threads_after_each_step_unless_they_are_fixed(monkeypatch, restore_threads, tmp_path,
                                                                              omp):
    """The main job's threads follow the load step by step; OMP_NUM_THREADS (or train.threads) fixes them."""
    from pact_fast.config import load_config
    from pact_fast.trainer import train
    from test_trainer import TINY

    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    monkeypatch.setattr(cpu, "_default_threads", 2)
    monkeypatch.setattr(cpu, "idle_cores", lambda interval=0.25: 0.2)  # busy at the start: one thread
    readings, seen = iter([2.0, 2.0, 0.4]), []

    def free(self):
        seen.append(torch.get_num_threads())
        return next(readings)

    monkeypatch.setattr(cpu.FreeCores, "free", free)
    logs = []
    train(load_config(None, TINY + ["train.steps=3", f"train.out_dir={tmp_path / 'run'}"]), log=logs.append)
    refits = [line for line in logs if "cores free of other processes" in line]
    if omp is None:
        assert seen == [1, 2, 2] and torch.get_num_threads() == 1
        assert len(refits) == 2 and "uses 2 threads (was 1;" in refits[0] and "uses 1 thread (was 2;" in refits[1]
    else:
        assert seen == [] and not refits and torch.get_num_threads() == restore_threads
