"""CPU threads that survive a busy machine.

OpenMP's worker threads (torch's intra-op pool) spin while they wait for the next parallel region. On cores
that another process also wants, the spinning workers and that process starve each other: 10 steps of the main
job on this 2-core machine took 12 s of steps alone and 171 s beside three busy processes
(bench/results/shared_cores_cpu.json). Two settings, both overridable:

- ``set_spin_limit`` (the ``pact-fast`` command, before torch loads OpenMP): ``GOMP_SPINCOUNT=10000``, a
  bounded spin before a worker sleeps. Passive waiting (no spin) halves the speed of a quiet machine on this
  job, whose parallel regions follow each other within microseconds; a short spin keeps that speed.
- ``fit_threads`` (the trainer and ``eval``, on CPU): as many threads as the cores that are idle when the run
  starts; ``FreeCores`` (the trainer) refits them after each step to the cores the other processes left free during
  it, so a run started beside a busy process gets its cores back when that process ends (it kept one thread to
  its end), and one started on a quiet machine gives a core up to a newcomer that takes one: a process
  in another session (a terminal's, a service; where the kernel shares the cores by session, ``autogroup``), not
  one in the run's own session, which gets a thread's share (2/3 of a core beside two threads on two cores), too
  little to move the count past ``HYSTERESIS``; two threads there did as well as one (bench/shared_cores.py).

An ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` in the environment, ``OMP_NUM_THREADS``, or ``train.threads``
always wins.
"""
import os
import time
from typing import Optional

SPIN_COUNT = "10000"
# train.threads above this many per core is refused: a thread past the cores only waits for one, and torch's pool
# crashed the process at 100000 (exit 139) and was killed at 1000 on this 2-core machine
MAX_THREADS_PER_CORE = 4
# FreeCores changes the count only when the free cores differ from it by more than this many cores (or a tenth of
# torch's default count, when more): a machine near the middle (1.5 free cores) would otherwise flip it every step
HYSTERESIS = 0.75
_default_threads = None  # torch's own count, before fit_threads first set one (a second run in a process starts there)


def set_spin_limit():
    """Bound OpenMP's spin-waiting (GNU OpenMP, which torch's CPU wheels use) unless the environment sets a
    waiting policy; only takes effect before torch is first imported."""
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)


def _cpu_times():
    """``(idle, total)`` seconds of all cores since boot (/proc/stat; idle counts iowait), or None without it."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        tick = os.sysconf("SC_CLK_TCK")
        return (fields[3] + fields[4]) / tick, sum(fields[:8]) / tick  # all but guest time (counted in user)
    except (OSError, ValueError, IndexError):
        return None


def idle_cores(interval=0.25):
    """Cores idle over ``interval`` seconds (a float, from /proc/stat), or None where that file is absent."""
    before = _cpu_times()
    time.sleep(interval)
    after = _cpu_times()
    if before is None or after is None:
        return None
    cores = os.cpu_count() or 1
    return cores * (after[0] - before[0]) / max(after[1] - before[1], 1e-9)


def _threads_for(cores, ceiling):
    """Threads for ``cores`` free (a float): rounded, at least 1, at most ``ceiling`` (torch's default)."""
    return max(1, min(ceiling, int(cores + 0.5)))


def threads_by_load(threads):
    """Whether the load chooses torch's threads: no ``train.threads`` (``threads`` 0) and no ``OMP_NUM_THREADS``."""
    return threads <= 0 and not os.environ.get("OMP_NUM_THREADS")


def default_threads():
    """torch's own intra-op thread count (as it was before this module first changed it)."""
    import torch

    global _default_threads
    if _default_threads is None:
        _default_threads = torch.get_num_threads()
    return _default_threads


def fit_threads(threads, log=None):
    """Set torch's intra-op threads: ``threads`` when > 0 (a ``ConfigError`` past ``MAX_THREADS_PER_CORE`` per
    core); else, unless ``OMP_NUM_THREADS`` is set, the cores idle right now (at least 1, at most torch's default).
    Returns the count in use."""
    import torch

    default = default_threads()
    if threads > 0:
        cores = os.cpu_count() or 1
        if threads > MAX_THREADS_PER_CORE * cores:
            from .config import ConfigError

            raise ConfigError(f"train.threads={threads}: more than {MAX_THREADS_PER_CORE} per core of this machine's "
                              f"{cores} (a thread past the cores only waits for one)")
        torch.set_num_threads(threads)
        return threads
    if not threads_by_load(threads):
        return torch.get_num_threads()
    idle = idle_cores()
    fitted = default if idle is None else _threads_for(idle, default)
    torch.set_num_threads(fitted)
    if fitted < default and log:
        log(f"[pact_fast] {idle:.1f} of {os.cpu_count()} cores idle: torch uses {fitted} thread"
            f"{'s' if fitted > 1 else ''} instead of {default} (train.threads=N chooses)")
    return fitted


class FreeCores:
    """Refits torch's threads, at each ``step()`` call, to the cores the other processes left free since the last
    call: the machine's busy time (/proc/stat) less this process's own CPU time (its ended subprocesses' included),
    over the wall time between. The count moves only when the free cores differ from it by more than
    ``HYSTERESIS`` (or a tenth of torch's default) and stays within 1 and torch's default. Processes of this run's
    own that live on (a vLLM engine's) would count as others: the trainer follows only with the in-process
    engine."""

    def __init__(self):
        import torch

        self.threads, self.ceiling = torch.get_num_threads(), default_threads()
        self._last = self._sample()

    @staticmethod
    def _sample():
        """(idle, total, own) seconds: the machine's, and this process's CPU time with its ended children's (a tool
        environment's subprocesses are this run's own work)."""
        times = _cpu_times()
        if times is None:
            return None
        own = os.times()
        return (*times, own.user + own.system + own.children_user + own.children_system)

    def free(self):
        """Cores the other processes left free since the last call (a float), or None where /proc/stat is absent."""
        now, last = self._sample(), self._last
        self._last = now
        if now is None or last is None or now[1] <= last[1]:
            return None
        cores = os.cpu_count() or 1
        span = now[1] - last[1]  # all cores' seconds
        others = (span - (now[0] - last[0])) - (now[2] - last[2])  # busy seconds less this process's
        return cores - max(0.0, others) * cores / span

    def step(self) -> Optional[str]:
        """Refit after a step; returns a line saying the change, or None when the count stays."""
        import torch

        free = self.free()
        if free is None or abs(free - self.threads) <= max(HYSTERESIS, 0.1 * self.ceiling):
            return None
        fitted = _threads_for(free, self.ceiling)
        if fitted == self.threads:
            return None
        said = (f"[pact_fast] {free:.1f} of {os.cpu_count()} cores free of other processes: torch now uses {fitted} "
                f"thread{'s' if fitted > 1 else ''} (was {self.threads}; train.threads=N fixes the count)")
        self.threads = fitted
        torch.set_num_threads(fitted)
        return said
