"""CPU threads that survive a busy machine.

OpenMP's worker threads (torch's intra-op pool) spin while they wait for the next parallel region. On cores
that another process also wants, the spinning workers and that process starve each other: 10 steps of the main
job on this 2-core machine took 12 s of steps alone and 171 s beside three busy processes
(bench/results/shared_cores_cpu.json). Two settings, both overridable:

- ``set_spin_limit`` (the ``pact-fast`` command, before torch loads OpenMP): ``GOMP_SPINCOUNT=10000``, a
  bounded spin before a worker sleeps. Passive waiting (no spin) halves the speed of a quiet machine on this
  job, whose parallel regions follow each other within microseconds; a short spin keeps that speed.
- ``fit_threads`` (the trainer, on CPU): as many threads as the cores that are idle when the run starts.

An ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` in the environment, ``OMP_NUM_THREADS``, or ``train.threads``
always wins.
"""
import os
import time

SPIN_COUNT = "10000"
# train.threads above this many per core is refused: a thread past the cores only waits for one, and torch's pool
# crashed the process at 100000 (exit 139) and was killed at 1000 on this 2-core machine
MAX_THREADS_PER_CORE = 4


def set_spin_limit():
    """Bound OpenMP's spin-waiting (GNU OpenMP, which torch's CPU wheels use) unless the environment sets a
    waiting policy; only takes effect before torch is first imported."""
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)


def idle_cores(interval=0.25):
    """Cores idle over ``interval`` seconds (a float, from /proc/stat), or None where that file is absent."""
    def sample():
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields[:8])  # idle + iowait, all but guest time

    try:
        idle0, total0 = sample()
        time.sleep(interval)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    cores = os.cpu_count() or 1
    return cores * (idle1 - idle0) / max(total1 - total0, 1)


def fit_threads(threads, log=None):
    """Set torch's intra-op threads: ``threads`` when > 0 (a ``ConfigError`` past ``MAX_THREADS_PER_CORE`` per
    core); else, unless ``OMP_NUM_THREADS`` is set, the cores idle right now (at least 1, at most torch's default).
    Returns the count in use."""
    import torch

    if threads > 0:
        cores = os.cpu_count() or 1
        if threads > MAX_THREADS_PER_CORE * cores:
            from .config import ConfigError

            raise ConfigError(f"train.threads={threads}: more than {MAX_THREADS_PER_CORE} per core of this machine's "
                              f"{cores} (a thread past the cores only waits for one)")
        torch.set_num_threads(threads)
        return threads
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    default = torch.get_num_threads()
    idle = idle_cores()
    if idle is None:
        return default
    fitted = max(1, min(default, int(idle + 0.5)))
    if fitted < default:
        torch.set_num_threads(fitted)
        if log:
            log(f"[pact_fast] {idle:.1f} of {os.cpu_count()} cores idle: torch uses {fitted} thread"
                f"{'s' if fitted > 1 else ''} instead of {default} (train.threads=N chooses)")
    return fitted
