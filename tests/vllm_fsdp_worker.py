"""``pact-fast train`` (``pact_fast.cli.main``) as one torchrun worker with the vLLM engine; used by
tests/test_rollout_vllm.py.

    torchrun --nproc_per_node=2 tests/vllm_fsdp_worker.py MODE OUT_DIR [train arguments...]

Every fingerprint check this rank's engine passes is appended to ``OUT_DIR/probes_rank{rank}.jsonl``: the
engine's weight pushes so far, the probe's max |logp diff|, and the float64 sum of the weights the rank pushed
(its unsharded copy, gathered from the FSDP2 shards). MODE ``corrupt``: rank 1 doubles the final norm's weight
in every push, so its engine serves other weights than its trainer's.
"""
import json
import sys
from pathlib import Path

from pact_fast import distributed as dist
from pact_fast.cli import main
from pact_fast.rollout_vllm import VLLMRolloutEngine


def record_checks(out_dir):
    check = VLLMRolloutEngine.check_fingerprint

    def recorded(self):
        err = check(self)
        weights_sum = sum(float(p.double().sum()) for p in self.model.parameters())
        with open(Path(out_dir) / f"probes_rank{dist.rank()}.jsonl", "a") as f:
            f.write(json.dumps({"syncs": self.syncs, "probe_err": err, "weights_sum": weights_sum}) + "\n")
        return err

    VLLMRolloutEngine.check_fingerprint = recorded


def corrupt_rank1_pushes():
    weights = VLLMRolloutEngine._weights

    def corrupted(self):
        return [(n, t * 2 if n == "model.norm.weight" and dist.rank() == 1 else t) for n, t in weights(self)]

    VLLMRolloutEngine._weights = corrupted


if __name__ == "__main__":
    mode, out_dir, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    record_checks(out_dir)
    if mode == "corrupt":
        corrupt_rank1_pushes()
    sys.exit(main(["train", "--out", out_dir, *args]))
