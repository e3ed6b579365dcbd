"""How a run stops: a Ctrl-C or SIGTERM (``Interrupt``: abort the step or finish it, then save), and, under torchrun,
an error on one rank in a part each rank runs alone (``agreed``): every rank stops at the same point, none left
waiting in a collective, so they can still save the last whole step together."""
import signal

from . import distributed as dist


class AgreedFailure(Exception):
    """Under torchrun, a part each rank runs alone (its rollouts, an evaluation) failed on some rank, and every rank
    raised this at the same point (``agreed``), none waiting in a collective: the ranks can still save the last whole
    step together. ``train`` raises ``error`` in its place: this rank's own, or ``distributed.OtherRankFailed``."""

    def __init__(self, error):
        super().__init__(str(error))
        self.error = error


def agreed(run):
    """``run()``, a part each rank runs alone; under torchrun, when it raised on any rank, every rank raises
    ``AgreedFailure`` here (a rank left its collectives while the others went on to theirs: a hang, then a
    crash that lost the steps since the last periodic checkpoint)."""
    if not dist.is_distributed():
        return run()
    error, out = None, None
    try:
        out = run()
    except Exception as exc:
        error = exc
    error = dist.agree_on_failure(error)
    if error is not None:
        raise AgreedFailure(error)
    return out


class StepAborted(BaseException):
    """The first Ctrl-C, raised inside the abortable part of a step (rollouts, scoring, backward). A
    ``BaseException``, as ``KeyboardInterrupt`` is: code that turns any ``Exception`` into a result (a tool
    environment's back-end errors, a library's feature probe) must not swallow it."""


class Interrupt:
    """The first Ctrl-C (or SIGTERM, what a batch scheduler, ``kill`` or ``timeout`` sends): inside the abortable part
    of a step (``abortable``: rollouts, scoring, backward, before any optimizer update) it aborts the step, and the
    loop drops its gradients and rewinds its data; elsewhere (the update, a checkpoint write) it is a flag the loop
    checks before the next step. Either way a checkpoint of the last whole step is saved (a SIGTERM killed the run on
    the spot: the steps since the last periodic checkpoint were lost). A second one quits without saving.

    In one process the abort is at once. Under torchrun a rank that left its step alone would leave the others
    waiting in a collective, or pair their collectives with its checkpoint's, so the ranks agree: a Ctrl-C ends a
    rank's rollouts at once (they make no collective call a Ctrl-C can cut: the vLLM engine's weight-sync exchange
    holds its raise back, ``distributed.signals_deferred``) and is otherwise a flag; at each agreement point
    (``agree``: after the rollouts, after every micro-batch's backward, at ``commit``), which every rank passes in
    the same order, all abort the step when any rank has had one, and the loop stops when any has.

    The handler's raise lands wherever Python happens to be; where that is a finaliser (``__del__``, a weakref
    callback) Python prints it and goes on, so ``commit`` raises it again before the first update."""

    def __init__(self, log, distributed=False):
        self.requested = False  # a Ctrl-C came to this rank
        self.interrupted = False  # the run stops for a Ctrl-C, this rank's or (under torchrun) another's
        self.abortable = self.local = False
        self.log, self.distributed = log, distributed

    def __enter__(self):
        self.previous = {signum: signal.signal(signum, self._handle) for signum in dist.STOP_SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        self.log(f"[pact_fast] {name}: saving a checkpoint of the last whole step (Ctrl-C again quits without saving)")
        if self.abortable and (self.local or not self.distributed):
            raise StepAborted

    def any_requested(self):
        """Whether a Ctrl-C came to this rank or, under torchrun, to any rank (a collective: every rank calls it at
        the same point); marks the run interrupted when one did."""
        anyone = dist.max_count(int(self.requested)) if self.distributed else self.requested
        self.interrupted = self.interrupted or bool(anyone)
        return self.interrupted

    def agree(self):
        """An agreement point of the abortable part: abort the step when a Ctrl-C came (its raise lost, or under
        torchrun to any rank)."""
        if self.abortable and self.any_requested():
            raise StepAborted

    def rollouts(self, sample):
        """``sample()``, the step's rollouts, then an agreement point; under torchrun a Ctrl-C ends them at once, and
        an error on any rank stops every rank there (``agreed``)."""
        if self.distributed:
            def local_sample():
                try:
                    self.local = True
                    return sample()
                except StepAborted:
                    return None
                finally:
                    self.local = False

            episodes = agreed(local_sample)
        else:
            episodes = sample()
        self.agree()
        return episodes

    def commit(self):
        """End the abortable part of a step (an agreement point): abort it if a Ctrl-C came during it, else from
        here on the step completes."""
        self.agree()
        self.abortable = False

    def __exit__(self, *exc):
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)
