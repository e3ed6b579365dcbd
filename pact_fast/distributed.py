"""Single-process and FSDP2 (``torchrun``) plumbing for the trainer, in one place.

Under ``torchrun --nproc_per_node=K -m pact_fast train``: the policy is sharded with
``fully_shard`` per decoder layer and at the root (bf16 mixed precision on CUDA); each rank takes
a contiguous share of the step's prompt groups; every rank runs the same number of micro-batches
(padding ones carry zero loss) so FSDP's collectives line up; gradients average across ranks;
metrics are averaged; rank 0 writes full (unsharded) checkpoints. Rollouts sample with an
unsharded copy of the policy whose weights are refreshed from the shards before every step, so
ranks never wait on each other's generation lengths. Without torchrun every function here is
the identity or its single-process meaning.
"""
import atexit
import copy
import math
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as td

from .config import ConfigError


def init():
    """Join torchrun's process group. With CUDA: NCCL for CUDA tensors (FSDP's collectives) and gloo for CPU ones
    (the step's counts: ``sum_counts``, ``max_count``, ``pad_micro_batches``, ``reduce_metrics``); a group of NCCL
    alone refuses every CPU tensor ("No backend type associated with device type cpu")."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not td.is_initialized():
        td.init_process_group(backend_name())
        if backend_name() == "gloo":  # (NCCL's teardown may wait on a rank that failed: left to exit, as before)
            atexit.register(_destroy)


EXIT_PAUSE_S = 0.5  # seconds a gloo rank waits at exit for its worker threads (``_destroy``)


def _destroy():
    """Leave the process group before the interpreter ends, after a pause in which a gloo worker thread can release
    the last collective's work. That release frees the work's tensors and takes the GIL to free their Python
    objects; once the interpreter is finalizing, taking the GIL ends the thread inside a C++ destructor, which
    aborts the process ("terminate called without an active exception", status -6, seen in a core dump: the
    thread in ``ProcessGroupGloo::runLoop`` -> ``~AsyncAllreduceWork`` -> ``TensorImpl::decref_pyobject``) after a
    run that ended well. A busy machine delays the thread past the main thread's exit; the sleep gives it the GIL."""
    if td.is_initialized():
        time.sleep(EXIT_PAUSE_S)
        td.destroy_process_group()


def backend_name():
    """The process group's backend: ``cpu:gloo,cuda:nccl`` where CUDA is available, else ``gloo``."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def is_distributed():
    return td.is_available() and td.is_initialized() and td.get_world_size() > 1


def rank():
    return td.get_rank() if is_distributed() else 0


def launch_rank():
    """This process's rank as torchrun set it (``RANK``; 0 without torchrun), before the process group exists."""
    return int(os.environ.get("RANK", "0"))


def silent(*args, **kwargs):
    """The log of a rank other than 0: says nothing."""


def world_size():
    return td.get_world_size() if is_distributed() else 1


def device(name):
    if torch.cuda.is_available() and name in ("auto", "cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def barrier():
    if is_distributed():
        td.barrier()


def decoder_layers(module):
    """The decoder layers (``<base>.layers``) of a causal LM or of the ``PackedScorer`` around one; ValueError when
    there are none."""
    model = getattr(module, "model", module)  # a PackedScorer holds the causal LM as .model
    base = getattr(model, getattr(model, "base_model_prefix", "model"), model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder layers found (expected <base>.layers)")
    return layers


def shard(model, bf16=False):
    """FSDP2 ``fully_shard`` on every decoder layer and the root; identity in a single process. A layer holding
    parameters of two dtypes (LoRA's float32 adapters on a bf16 base, ``model.lora.base_dtype``) needs torch >= 2.8,
    whose FSDP2 asks only the trainable ones to share a dtype; before, a ``ConfigError`` (one line)."""
    if not is_distributed():
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()})
    if len(dtypes) > 1 and tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 8):
        raise ConfigError(f"the model holds {' and '.join(dtypes)} parameters (model.lora.base_dtype): FSDP2 of torch "
                          f"{torch.__version__} refuses a layer of mixed dtypes; under torchrun use torch >= 2.8, or "
                          "model.lora.base_dtype=float32")

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def rollout_copy(model):
    """The model rollouts sample with: the policy itself, or (under torchrun, made before sharding) a copy
    that stays unsharded and is refreshed from the shards before every step."""
    if not is_distributed():
        return model
    return copy.deepcopy(model).eval().requires_grad_(False)


def sync_rollout_weights(scorer, rollout_model):
    """Copy the (possibly sharded) policy's weights into the rollout model; a no-op when they are one."""
    if rollout_model is getattr(scorer, "model", scorer):
        return
    with torch.no_grad():
        full = {k.removeprefix("model."): v for k, v in scorer.named_parameters()}
        for name, p in rollout_model.named_parameters():
            src = full[name]
            p.copy_(src.full_tensor() if hasattr(src, "full_tensor") else src)


def shard_list(items):
    """This rank's contiguous share of a step's items (prompt groups)."""
    n, w, r = len(items), world_size(), rank()
    if n % w:
        raise ValueError(f"train.prompts_per_step={n} must be a multiple of the world size {w}")
    return items[r * n // w:(r + 1) * n // w]


@dataclass
class MicroBatch:
    indices: list
    padding: bool = False  # a repeat run only so that every rank makes the same collective calls


def pad_micro_batches(batches):
    out = [MicroBatch(b) for b in batches]
    if is_distributed():
        n = torch.tensor([len(out)])
        td.all_reduce(n, op=td.ReduceOp.MAX)
        out += [MicroBatch(batches[0], padding=True) for _ in range(int(n) - len(out))]
    return out


def gather_errors(error):
    """Every rank's ``error`` (a message, or None), in rank order; ``[error]`` in a single process. Each rank
    calls it at the same point, so a failure on one rank can stop them all, none left waiting in a collective."""
    if not is_distributed():
        return [error]
    errors = [None] * world_size()
    td.all_gather_object(errors, error)
    return errors


class OtherRankFailed(RuntimeError):
    """What the other ranks raise when one rank's error stopped a part that each rank runs alone (its rollouts, an
    evaluation); the message names that rank and its error, whose traceback is in that rank's output."""


def agree_on_failure(error):
    """After a part each rank runs alone, every rank at the same point: None when no rank's ``error`` (an exception
    or None) is set; else what this rank raises, its own error or an ``OtherRankFailed`` naming the first failed
    rank's (``error`` itself in one process)."""
    if not max_count(int(error is not None)):
        return error
    messages = gather_errors(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        return error
    failed, message = next((r, m) for r, m in enumerate(messages) if m is not None)
    return OtherRankFailed(f"rank {failed} failed: {message}")


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # what the trainer stops on (stopping.Interrupt)


@contextmanager
def signals_deferred():
    """Under torchrun, a Ctrl-C or SIGTERM that comes inside the block is handled when the block ends: the
    handler's raise (the trainer's step abort, ``KeyboardInterrupt``) would otherwise land before or between the
    collectives of a block the other ranks run to its end (``gather_errors`` after a rollout engine's weight sync,
    the weight sync before the final evaluation), leaving them waiting or pairing those collectives with this rank's
    next ones. Nothing in a single process."""
    if not is_distributed() or threading.current_thread() is not threading.main_thread():
        yield
        return
    held = []  # (signal, frame), one per signal held back
    previous = {signum: signal.signal(signum, lambda signum, frame: held.append((signum, frame)))
                for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        raised = None
        for signum, frame in held:  # the handler's raise of the last one wins (a second Ctrl-C: KeyboardInterrupt)
            try:
                handler = previous[signum]
                if callable(handler):
                    handler(signum, frame)
                elif handler == signal.SIG_DFL:
                    signal.raise_signal(signum)
            except BaseException as exc:  # the handler's raise: the trainer's step abort, KeyboardInterrupt
                raised = exc
        if raised is not None:
            raise raised


def check_same(value, what):
    """Raise ``ConfigError`` naming the first rank whose ``value`` (a string, e.g. a fingerprint of the config and
    data) differs from rank 0's: ranks that train on other data or options would average gradients of different
    steps without a word. Nothing in a single process."""
    if not is_distributed():
        return
    values = [None] * world_size()
    td.all_gather_object(values, value)
    other = next((r for r, v in enumerate(values) if v != values[0]), None)
    if other is not None:
        raise ConfigError(f"torchrun: rank {other}'s {what} differs from rank 0's; every rank must run the same "
                          "command on the same data")


def sum_counts(values):
    """Sum integers over ranks."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.long)
    td.all_reduce(t)
    return t.tolist()


def max_count(value):
    """The largest of an integer over ranks."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.long)
    td.all_reduce(t, op=td.ReduceOp.MAX)
    return int(t)


def clip_grad_norm(model, max_norm):
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def reduce_metrics(metrics, summed=(), largest=(), weights=None):
    """Each numeric metric reduced over the ranks that report it: the mean, but the sum for the keys in ``summed``
    (counts each rank holds a share of), the maximum for those in ``largest`` or ending with one of them (a step
    lasts as long as its slowest rank; ``po/ratio_max``: decided on the keys of all ranks) and, for a key of ``weights`` ({key: this rank's weight}, e.g. its rollout tokens), the mean
    weighted by the ranks' weights (the plain mean where they are all 0). A rank may lack a key another has, e.g. a
    term none of its micro-batches held: the key lists are gathered first, so the reductions line up."""
    if not is_distributed():
        return metrics
    mine = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step")
    lists = [None] * world_size()
    td.all_gather_object(lists, mine)
    keys = sorted(set().union(*lists))
    weights = weights or {}
    w = [float(weights.get(k, 1.0)) if k in metrics else 0.0 for k in keys]
    t = torch.tensor([[float(metrics[k]) if k in metrics else 0.0 for k in keys],
                      [1.0 if k in metrics else 0.0 for k in keys],
                      [wk * float(metrics[k]) if k in metrics else 0.0 for wk, k in zip(w, keys)], w],
                     dtype=torch.float64)
    top = torch.tensor([float(metrics[k]) if k in metrics else -math.inf for k in keys], dtype=torch.float64)
    td.all_reduce(t)
    td.all_reduce(top, op=td.ReduceOp.MAX)
    out = {}
    for k, total, n, weighted, weight, most in zip(keys, *t.tolist(), top.tolist()):
        out[k] = total if k in summed else most if k.endswith(tuple(largest)) else weighted / weight if weight else \
            total / n
    return {**metrics, **out}


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model):
    if not is_distributed():
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options())


def full_optimizer_state(model, optimizer):
    if not is_distributed():
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_full_options())


def tied_keys(model):
    tied = getattr(model, "_tied_weights_keys", None) or []
    return set(tied if isinstance(tied, (list, set, tuple)) else tied.keys())
