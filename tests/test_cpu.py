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
    torch.set_num_threads(2)
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
