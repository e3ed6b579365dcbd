"""PACTGRPOTrainer under torchrun (DDP on gloo, CPU); used by test_adapters_trl.

Writes, per rank, what each rollout row of every generation batch carried (its global prompt group,
anchoring draw, how many trace sequences it holds), the trace sequences and SFT scale of each pact_loss
call, and the final weights."""
import json
import sys
from pathlib import Path

import torch.distributed as dist

import test_adapters_trl as T
import pact_fast.adapters.trl as trl_adapter
from pact_fast.adapters.trl import PACTGRPOTrainer, pact_config_from_grpo_args

CALLS = []  # per pact_loss call of this rank: its trace sequences and sft_scale
_pact_loss = trl_adapter.pact_loss


def recording_pact_loss(batch, config, progress, **kwargs):
    CALLS.append({"traces": batch.sft_components.shape[0], "sft_scale": kwargs["sft_scale"]})
    return _pact_loss(batch, config, progress, **kwargs)


trl_adapter.pact_loss = recording_pact_loss


class Logging(PACTGRPOTrainer):
    rows = []

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        for i, owned in enumerate(out["pact_sft"]):
            self.rows.append({"step": self.state.global_step, "group": out["pact_group"][i].item(),
                              "anchored": out["pact_anchored"][i].item(), "sft": len(owned),
                              "prompt": out["prompt_ids"][i][out["prompt_mask"][i].bool()].tolist()})
        return out


if __name__ == "__main__":
    out = Path(sys.argv[1])
    from datasets import Dataset

    # 2 ranks x 2 rollouts = one generation batch of 4 = one prompt group split across the ranks
    args = T._args(out, per_device_train_batch_size=2, gradient_accumulation_steps=1, num_generations=4,
                   max_steps=2, ddp_backend="gloo")
    trainer = Logging(model=T.tiny_causal_lm("llama", vocab_size=len(T.TOKENIZER)), reward_funcs=T._reward,
                      args=args, train_dataset=Dataset.from_list(T._rows(4)), processing_class=T.TOKENIZER,
                      pact_config=pact_config_from_grpo_args(args, anchor_q=0.5))
    trainer.train()
    rank = dist.get_rank() if dist.is_initialized() else 0
    weights = {k: v.tolist() for k, v in trainer.model.state_dict().items()}
    (out / f"rank{rank}.json").write_text(json.dumps({"rows": trainer.rows, "calls": CALLS, "weights": weights}))
