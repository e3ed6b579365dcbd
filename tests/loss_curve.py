"""The stored loss curve that pins the training loop: a tiny model trained 20 steps on CPU in float32 with a
scripted rollout engine, its per-step losses, reward and gradient norm kept in ``tests/data/loss_curve.json``.

When a change is meant to alter training, regenerate the file from the repository root and commit it with the
change:

    python tests/loss_curve.py
"""
import json
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from replay_engine import ReplayEngine  # noqa: E402

from pact_fast.rollout import Episode  # noqa: E402

STORED = HERE / "data" / "loss_curve.json"
OVERRIDES = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
             "model.head_dim=16", "model.intermediate_size=64", "data.train_tasks=24", "data.eval_tasks=2",
             "train.prompts_per_step=4", "rollout.group_size=2", "train.progress=false", "train.tensorboard=false",
             "train.micro_batch_tokens=700", "train.warmup_steps=2", "train.steps=20", "train.save_every=0",
             "loss.anchor_q=0.5"]
KEYS = ("loss/total", "loss/rl", "loss/sft", "reward_mean", "grad_norm", "lr")


class ScriptedEngine(ReplayEngine):
    """The expert trace as every episode, cut to a length and given a 0/1 reward drawn from the engine's
    generator, which the trainer seeds from (seed, step): rewards, advantages and lengths vary step to step,
    reproducibly, without sampling from the model."""

    def rollout(self, examples, make_env, group_size=None, greedy=None):
        groups = super().rollout(examples, make_env, group_size, greedy)
        out = []
        for group in groups:
            eps = []
            for ep in group:
                n = len(ep.response_ids) - int(torch.randint(0, 4, (1,), generator=self.generator))
                reward = float(torch.rand(1, generator=self.generator) < 0.5)
                eps.append(Episode(ep.prompt_ids, ep.response_ids[:n], ep.response_mask[:n],
                                   ep.behavior_logp[:n], reward=reward, turns=1, finish="answer"))
            out.append(eps)
        return out


def run_curve(out_dir):
    """Train the pinned configuration into ``out_dir``; per step, the values of ``KEYS``."""
    from pact_fast.config import load_config
    from pact_fast.trainer import train

    config = load_config(None, OVERRIDES + [f"train.out_dir={out_dir}"])
    train(config, engine_factory=lambda m, t, c, s: ScriptedEngine(m, t, c, s), log=lambda *a: None)
    rows = [json.loads(line) for line in open(Path(out_dir) / "metrics.jsonl") if "reward_mean" in line]
    return [{"step": r["step"], **{k: r[k] for k in KEYS}} for r in rows]


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        curve = run_curve(tmp)
    STORED.write_text(json.dumps({"overrides": OVERRIDES, "steps": curve}, indent=1) + "\n")
    print(f"wrote {STORED}: {len(curve)} steps")
