"""Two gloo ranks reduce hand-made step statistics with ``trainer._step_metrics``; rank 0 writes what it logs
(JSON) to the file given. Used by tests/test_trainer.py."""
import json
import os
import sys

import torch
import torch.distributed as td


def run(rank, out, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    td.init_process_group("gloo", rank=rank, world_size=2)
    from pact_fast.distributed import _destroy
    from pact_fast.trainer import StepStats, _average, _step_metrics

    # rank 0: 2 rollouts of 200 tokens, rewards 1, 1, |advantage| 1, its largest ratio 1.2; rank 1: 2 rollouts of
    # 20 tokens, rewards 0, 0, |advantage| 3, and a micro-batch with no rollout (weight 0: its ratio_mean falls back
    # to 1.0), largest ratio 1.7
    if rank == 0:
        micro_batches, rewards = [((200, 2, 2), {"loss/rl": 0.1, "po/ratio_mean": 0.9, "reward_mean": 1.0,
                                                 "po/ratio_max": 1.2, "adv_abs_mean": 1.0})], [1.0, 1.0]
    else:
        micro_batches, rewards = [((20, 0, 2), {"loss/rl": 0.3, "po/ratio_mean": 0.8, "reward_mean": 0.0,
                                                "po/ratio_max": 1.7, "adv_abs_mean": 3.0}),
                                  ((0, 2, 0), {"loss/rl": 0.0, "po/ratio_mean": 1.0, "reward_mean": 0.0,
                                               "adv_abs_mean": 0.0})], [0.0, 0.0]
    means, weights = _average(micro_batches)
    stats = StepStats(1, means, 1e-5, 1.0, False, False, torch.tensor(rewards), [], 0, 1, 0, None, 1.0, 1.0, 0.0,
                      0, weights)
    logged = _step_metrics(stats)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(logged, f)
    _destroy()  # as the trainer leaves: a bare destroy_process_group aborted rank 0 at exit on a busy CI machine


if __name__ == "__main__":
    import torch.multiprocessing as mp

    mp.spawn(run, args=(sys.argv[1], int(sys.argv[2])), nprocs=2)
