"""TRL-style scenarios run against PACTGRPOTrainer: each trains a tiny random model a couple of optimizer steps
through GRPOTrainer.train (CPU) with one GRPOConfig feature on, and checks what TRL documents for it plus that
the PACT terms are there. Written from TRL's documented behaviour (trl 1.16); test_adapters_trl.py holds the
exact comparisons with GRPOTrainer's own loss."""
import json
import math

import pytest
import torch
from datasets import Dataset

from models import tiny_causal_lm
from pact_fast.adapters.trl import PACTGRPOTrainer
from test_adapters_trl import TOKENIZER, _args, _reward, _rows, tiny_moe_lm


def _length_reward(completions, **kwargs):
    return [float(len(c if isinstance(c, str) else c[0]["content"])) / 10 for c in completions]


def _train(tmp_path, overrides=None, *, model=None, rows=None, reward_funcs=_reward, scoring="padded", **kwargs):
    """Trains and returns the trainer after checking that the weights moved and every logged loss is finite."""
    if model is None:
        model = tiny_causal_lm("llama", vocab_size=len(TOKENIZER))
    if isinstance(model, str):
        before = None  # loaded by TRL from a path
    else:
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = PACTGRPOTrainer(model=model, reward_funcs=reward_funcs, args=_args(tmp_path, **(overrides or {})),
                              train_dataset=rows if rows is not None else Dataset.from_list(_rows()),
                              processing_class=TOKENIZER, scoring=scoring, **kwargs)
    trainer.train()
    if before is not None:
        after = dict(trainer.model.named_parameters())
        assert any(not torch.equal(before[name], after[name]) for name in before), "no weight moved"
    losses = [h["pact/loss/total"] for h in trainer.state.log_history if "pact/loss/total" in h]
    assert losses and all(math.isfinite(x) for x in losses)
    assert any(h.get("pact/loss/sft", 0) > 0 for h in trainer.state.log_history)  # the trace was learned from
    return trainer


def _logged(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


@pytest.mark.parametrize("overrides", [
    pytest.param({}, id="dapo-default"),
    pytest.param({"loss_type": "grpo"}, id="grpo"),
    pytest.param({"loss_type": "bnpo"}, id="bnpo"),
    pytest.param({"loss_type": "dr_grpo"}, id="dr_grpo"),
    pytest.param({"num_iterations": 2}, id="num_iterations-2"),
    pytest.param({"num_generations": 4, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2},
                 id="group-across-micro-batches"),
    pytest.param({"steps_per_generation": 4, "gradient_accumulation_steps": 2}, id="steps_per_generation-4"),
    pytest.param({"scale_rewards": "batch"}, id="scale_rewards-batch"),
    pytest.param({"epsilon": 0.1, "epsilon_high": 0.28}, id="asymmetric-clip"),
])
def test_trains(tmp_path, overrides):
    _train(tmp_path, overrides)


def test_trains_with_packed_scoring(tmp_path):
    _train(tmp_path, {"num_iterations": 2}, model=tiny_causal_lm("qwen3", vocab_size=len(TOKENIZER)),
           scoring="packed")


def test_kl_to_a_synced_reference_model(tmp_path):
    model_dir = tmp_path / "model"  # TRL loads the reference model from the policy's path
    tiny_causal_lm("llama", vocab_size=len(TOKENIZER)).save_pretrained(model_dir)
    trainer = _train(tmp_path, {"beta": 0.1, "sync_ref_model": True, "ref_model_sync_steps": 1,
                                "ref_model_mixup_alpha": 0.5, "max_steps": 3}, model=str(model_dir))
    assert trainer.pact_config.beta_kl == 0.1
    assert _logged(trainer, "pact/loss/kl")


def test_mask_truncated_completions(tmp_path):
    """Truncated completions leave the RL terms (TRL zeroes their completion mask); the trace SFT stays."""
    trainer = _train(tmp_path, {"mask_truncated_completions": True, "max_completion_length": 4})
    assert _logged(trainer, "completions/clipped_ratio")


def test_multiple_reward_functions_with_weights_and_string_prompts(tmp_path):
    rows = [{"prompt": r["prompt"][-1]["content"], "trace": r["trace"]} for r in _rows()]
    trainer = _train(tmp_path, {"reward_weights": [0.7, 0.3]}, rows=Dataset.from_list(rows),
                     reward_funcs=[_reward, _length_reward])
    assert _logged(trainer, "rewards/_length_reward/mean") and _logged(trainer, "rewards/_reward/mean")


def test_iterable_dataset(tmp_path):
    _train(tmp_path, rows=Dataset.from_list(_rows()).to_iterable_dataset())


def test_moe_model_with_its_router_loss(tmp_path):
    """TRL turns on the load-balancing loss of a MoE model by default, with the config's coefficient."""
    trainer = _train(tmp_path, model=tiny_moe_lm(len(TOKENIZER)))
    assert trainer.router_aux_loss_coef == 0.001
    assert all(x > 0 for x in _logged(trainer, "pact/aux_loss"))


def test_static_entropy_bonus(tmp_path):
    trainer = _train(tmp_path, {"entropy_coef": 0.01})
    assert _logged(trainer, "pact/entropy_coef") and set(_logged(trainer, "pact/entropy_coef")) == {0.01}


def test_adaptive_entropy_control_checkpoints_its_state(tmp_path):
    """The controller raises the coefficient while the entropy is below the target, and TRL's checkpoint keeps
    the coefficient the adapter moved."""
    trainer = _train(tmp_path, {"use_adaptive_entropy": True, "entropy_target": 100.0, "entropy_coef": 0.0,
                                "save_strategy": "steps", "save_steps": 2, "max_steps": 2})
    assert trainer.entropy_coef == pytest.approx(2 * trainer.args.entropy_coef_delta)
    state = json.loads((tmp_path / "checkpoint-2" / "entropy_ctrl_state.json").read_text())
    assert state["entropy_coef"] == pytest.approx(trainer.entropy_coef)


def test_two_sided_clipping(tmp_path):
    trainer = _train(tmp_path, {"delta": 1.5, "num_iterations": 2})
    assert trainer.pact_config.dual_clip == 1.5


def test_entropy_mask(tmp_path):
    _train(tmp_path, {"top_entropy_quantile": 0.2})


def test_off_policy_mask(tmp_path):
    trainer = _train(tmp_path, {"off_policy_mask_threshold": 0.5, "num_iterations": 2})
    assert _logged(trainer, "pact/off_policy_kept")


def test_evaluation_during_training(tmp_path):
    model = tiny_causal_lm("llama", vocab_size=len(TOKENIZER))
    trainer = _train(tmp_path, {"eval_strategy": "steps", "eval_steps": 1, "per_device_eval_batch_size": 2},
                     model=model, eval_dataset=Dataset.from_list(_rows(2, seed=9)))
    assert len(_logged(trainer, "eval_pact/loss/total")) == 2


@pytest.mark.parametrize("overrides", [
    pytest.param({"loss_type": "cispo"}, id="cispo"),
    pytest.param({"loss_type": "sapo"}, id="sapo"),
    pytest.param({"loss_type": "luspo"}, id="luspo"),
    pytest.param({"loss_type": "vespo"}, id="vespo"),
    pytest.param({"importance_sampling_level": "sequence"}, id="sequence-level-ratios"),
])
def test_refused_before_any_training(tmp_path, overrides):
    with pytest.raises(ValueError, match="PACTGRPOTrainer does not support"):
        PACTGRPOTrainer(model=tiny_causal_lm("llama", vocab_size=len(TOKENIZER)), reward_funcs=_reward,
                        args=_args(tmp_path, **overrides), train_dataset=Dataset.from_list(_rows()),
                        processing_class=TOKENIZER)
