"""``python -m pact_fast`` and the ``pact-fast`` command: ``pact_fast.cli.main`` behind a Ctrl-C guard.

The guard sits here, before ``pact_fast.cli`` is imported, so that a Ctrl-C while torch loads, while the model
is built or during the held-out evaluation (or a second Ctrl-C) ends with one line and status 130, never a
traceback. A Ctrl-C during training is the trainer's: it saves a checkpoint (``pact_fast.trainer``). The
OpenMP waiting policy is set here too, before torch loads (below).
"""
import os
import sys

# OpenMP's default waiting policy lets idle worker threads spin; on cores shared with another process the
# spinning workers and that process starve each other (10 steps of the main job: 317 s spinning vs 25 s
# sleeping, on a loaded 2-core machine). It is read once, when torch loads OpenMP, so it is set before any
# torch import; an OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def entry():
    try:
        from .cli import main

        return main()
    except KeyboardInterrupt:
        print("pact-fast: interrupted; checkpoints already written are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(entry())
