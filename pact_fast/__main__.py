"""``python -m pact_fast`` and the ``pact-fast`` command: ``pact_fast.cli.main`` behind a Ctrl-C guard.

The guard sits here, before ``pact_fast.cli`` is imported, so that a Ctrl-C while torch loads, while the model
is built or during the held-out evaluation (or a second Ctrl-C) ends with one line and status 130, never a
traceback. A Ctrl-C during training is the trainer's: it saves a checkpoint (``pact_fast.trainer``). OpenMP's
spin limit is set here too, before torch loads.
"""
import os
import sys

from .cpu import set_spin_limit

set_spin_limit()  # read once, when torch loads OpenMP: before any torch import (pact_fast.cpu)


def entry():
    try:
        from .cli import main

        return main()
    except KeyboardInterrupt:
        print("pact-fast: interrupted; checkpoints already written are kept", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (`pact-fast plan ... | head`): stop quietly, as a Unix filter does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141


if __name__ == "__main__":
    sys.exit(entry())
