"""The torchrun process group (``pact_fast.distributed``)."""
import torch
from torch.distributed.distributed_c10d import Backend, BackendConfig

from pact_fast import distributed as dist


def test_with_cuda_the_process_group_keeps_gloo_for_cpu_tensors(monkeypatch):
    """With CUDA the group was NCCL alone, which refuses CPU tensors ("No backend type associated with device type
    cpu"): a torchrun run on GPUs stopped at its first step's counts (``sum_counts``, CPU tensors)."""
    seen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dist.td, "is_initialized", lambda: False)
    monkeypatch.setattr(dist.td, "init_process_group", lambda backend: seen.append(backend))
    monkeypatch.setenv("WORLD_SIZE", "2")
    dist.init()
    assert BackendConfig(Backend(seen[0])).get_device_backend_map() == {"cpu": "gloo", "cuda": "nccl"}


def test_without_cuda_the_process_group_is_gloo(monkeypatch):
    seen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dist.td, "is_initialized", lambda: False)
    monkeypatch.setattr(dist.td, "init_process_group", lambda backend: seen.append(backend))
    monkeypatch.setenv("WORLD_SIZE", "2")
    dist.init()
    assert BackendConfig(Backend(seen[0])).get_device_backend_map() == {"cpu": "gloo", "cuda": "gloo"}
