"""A stateful tool back-end in a worker process, each call under a wall-clock limit.

Why a process: a Python thread cannot be stopped, and a model-chosen call such as
``power(base=10, exponent=100000000)`` spends minutes inside one C operation (``10 ** 100000000``)
that holds the GIL, so neither a thread with a timeout nor ``signal.alarm`` (main thread only,
and its handler runs only between bytecodes) can bound it. A child process can be killed.

``Sandbox(factory, args)`` builds ``factory(*args)`` in a child on first use and forwards method
calls to it. When a call overruns ``timeout`` seconds the child is killed, a new one is built
from the same ``factory(*args)``, and the calls that had completed are replayed in order, so the
object is left as it was before the overrunning call (this needs a deterministic object, which
BFCL's back-ends are: their randomness is seeded by the scenario).

Children are forked (``multiprocessing`` "fork" start method, as torch's ``DataLoader`` workers
are): a fork is cheap and, unlike "spawn" and "forkserver", does not re-import the parent's
``__main__`` (an unguarded training script would start training again in every child). The
child only runs the back-end's Python code, never torch. Where fork does not exist, "spawn".
"""
import multiprocessing
import signal
import warnings

CALL_TIMEOUT_S = 5.0  # default wall-clock limit of one call, seconds


def _context():
    """The multiprocessing context children come from (see the module docstring)."""
    return multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")


def _serve(conn, factory, args):
    """The child: build the object, then answer (method, args, kwargs) messages until ``None`` or EOF. A Ctrl-C is
    the parent's to handle (a forked child inherits the trainer's handler); the parent ends its children, and a
    SIGTERM (multiprocessing's at the parent's exit) ends the child, not the trainer's handler in it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    obj = factory(*args)
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        method, call_args, call_kwargs = message
        try:
            conn.send(("ok", getattr(obj, method)(*call_args, **call_kwargs)))
        except Exception as exc:  # reported to the parent, which decides what the model sees
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class SandboxTimeout(Exception):
    """A call ran past the time limit; the sandboxed object is back in its state before the call."""


class Sandbox:
    """``factory(*args)`` in a child process; ``call(method, *args, **kwargs)`` with a time limit.

    ``record=False`` marks a call that does not change the object (a state snapshot): it is not
    replayed after a restart. Raises ``SandboxTimeout`` on an overrun and ``RuntimeError`` for an
    exception inside the child (its type and message in the text) or a call that ended the child (its exit code).
    """

    def __init__(self, factory, args=(), *, timeout=CALL_TIMEOUT_S):
        if not timeout > 0:
            raise ValueError(f"Sandbox: timeout={timeout} must be > 0 seconds")
        self.factory, self.args, self.timeout = factory, tuple(args), float(timeout)
        self.completed = []  # (method, args, kwargs) of the recorded calls that returned
        self.process = self.conn = None
        self.restarts = 0
        self.lost = None  # why the object's state is gone (a replay overran): every later call raises it

    def _start(self):
        ctx = _context()
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, self.factory, self.args), daemon=True)
        with warnings.catch_warnings():
            # Python >= 3.12 warns on fork from a process with threads (torch's): the child never
            # touches torch or a lock those threads hold, it runs only the back-end's Python code.
            warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
            self.process.start()
        child.close()

    def _send(self, message, timeout):
        self.conn.send(message)
        if not self.conn.poll(timeout):
            raise SandboxTimeout
        return self.conn.recv()

    def call(self, method, *args, record=True, **kwargs):
        if self.lost:  # a fresh object would answer as if the completed calls never ran
            raise RuntimeError(self.lost)
        if self.process is None:
            self._start()
        try:
            status, value = self._send((method, args, kwargs), self.timeout)
        except SandboxTimeout:
            self._restart()
            raise SandboxTimeout(f"{method} ran past the time limit of {self.timeout:g} s") from None
        except (EOFError, BrokenPipeError, ConnectionResetError):  # the child died in the call (os._exit, a crash)
            self.process.join(timeout=5)
            code = self.process.exitcode
            self._restart()
            raise RuntimeError(f"{method} ended the back-end's process (exit code {code}); it was restarted with "
                               "the state before the call") from None
        if status == "error":
            raise RuntimeError(value)
        if record:
            self.completed.append((method, args, kwargs))
        return value

    def _restart(self):
        """Kill the child; build a new one and replay the completed calls (each under the time limit)."""
        self._stop()
        self.restarts += 1
        self._start()
        for message in self.completed:
            try:
                self._send(message, self.timeout)
            except (SandboxTimeout, EOFError, BrokenPipeError, ConnectionResetError):
                self._stop()
                self.lost = ("Sandbox: replaying completed calls after a restart overran the time limit; the "
                             "object's state is lost")
                raise RuntimeError(self.lost) from None

    def close(self):
        """Stop the child and forget the completed calls: a later call starts from ``factory(*args)``."""
        self._stop()
        self.completed = []
        self.lost = None

    def _stop(self):
        if self.process is not None:
            self.process.kill()
            self.process.join()
            self.conn.close()
        self.process = self.conn = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the daemon child dies with us
            pass
