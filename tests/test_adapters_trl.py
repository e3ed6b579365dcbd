"""PACTGRPOTrainer through TRL's real training loop (GRPOTrainer.train on CPU, tiny random model)."""
import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from models import tiny_causal_lm
from pact_fast.adapters import trl as adapter
from pact_fast.adapters.trl import PACTGRPOTrainer, pact_config_from_grpo_args
from pact_fast.chat import prompt_ids, trace_conditioned_prompt_ids, trace_sequences
from pact_fast.data import DataFormatError, parse_example
from pact_fast.envs.multihop import make_tasks
from pact_fast.envs.tokenizer import build_tokenizer
from pact_fast.losses import PACTBatch, pact_loss

TOKENIZER = build_tokenizer()


def _rows(n=4, seed=1):
    return [{"prompt": r["messages"], "trace": json.dumps(r["trace"]), "id": r["id"]}
            for r in make_tasks(n, seed=seed, hops=(1, 2))]


def _reward(completions, **kwargs):
    # a deterministic function of the sampled text with spread inside a group (messages or, for string
    # prompts, strings)
    return [float(len((c if isinstance(c, str) else c[0]["content"]).split()) % 3) for c in completions]


def tiny_moe_lm(vocab_size, seed=0):
    """A 2-layer Qwen3-MoE (4 experts, 2 per token) whose config carries router_aux_loss_coef=0.001."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            num_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
                            tie_word_embeddings=False)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().eval()


def _args(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                  num_generations=2, max_completion_length=8, max_steps=2, learning_rate=1e-2, use_cpu=True,
                  report_to=[], logging_steps=1, save_strategy="no", seed=0, bf16=False)  # fp32, to compare
    values.update(overrides)
    return GRPOConfig(**values)


class Recording(PACTGRPOTrainer):
    """Keeps every micro-batch's inputs, loss and the weights it was computed with."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records = []

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.records.append((inputs, loss.detach(), weights, self.pact_progress()))
        return loss


def _unpad(ids, mask):
    return ids[mask.bool()].tolist()


def _completion_logp(model, context, completion):
    """float64 log-probs of ``completion`` after ``context`` from one unpadded forward. [len(completion)]"""
    ids = torch.tensor([context + completion])
    logp = model(input_ids=ids).logits[0].double().log_softmax(-1)
    n = len(context)
    return logp[n - 1:n - 1 + len(completion)].gather(-1, torch.tensor(completion)[:, None])[:, 0]


def test_a_step_is_the_float64_pact_loss_of_its_generation_batch(tmp_path):
    """Two micro-batches of one optimizer step add up to pact_loss of the whole generation batch,
    recomputed here with separate unpadded float64 forwards and our own prompt rendering."""
    rows = _rows()
    trainer = Recording(model=tiny_causal_lm("llama", vocab_size=len(TOKENIZER)), reward_funcs=_reward,
                        args=_args(tmp_path), train_dataset=Dataset.from_list(rows), processing_class=TOKENIZER)
    trainer.train()
    assert len(trainer.records) == 4  # 2 steps x 2 micro-batches
    examples = {}
    for r in rows:
        ex = parse_example({"id": r["id"], "messages": r["prompt"], "trace": json.loads(r["trace"])})
        examples[tuple(prompt_ids(TOKENIZER, ex))] = ex

    for step in range(2):
        micro = trainer.records[2 * step: 2 * step + 2]
        weights, progress = micro[0][2], micro[0][3]
        assert all(torch.equal(weights[k], micro[1][2][k]) for k in weights)  # gradient accumulation
        reference = tiny_causal_lm("llama", vocab_size=len(TOKENIZER))
        reference.load_state_dict(weights)
        reference = reference.double()

        logp_po, logp_tc, masks, adv, anchored, groups, sft = [], [], [], [], [], [], []
        with torch.no_grad():
            for inputs, *_ in micro:
                for i in range(inputs["prompt_ids"].shape[0]):
                    prompt = _unpad(inputs["prompt_ids"][i], inputs["prompt_mask"][i])
                    example = examples[tuple(prompt)]  # TRL's prompt tokens are ours
                    tc_prompt = trace_conditioned_prompt_ids(TOKENIZER, example)
                    assert _unpad(inputs["pact_tc_prompt_ids"][i], inputs["pact_tc_prompt_mask"][i]) == tc_prompt
                    completion = _unpad(inputs["completion_ids"][i], inputs["completion_mask"][i])
                    logp_po.append(_completion_logp(reference, prompt, completion))
                    logp_tc.append(_completion_logp(reference, tc_prompt, completion))
                    masks.append(torch.ones(len(completion)))
                    adv.append(inputs["advantages"][i])
                    anchored.append(inputs["pact_anchored"][i])
                    groups.append(inputs["pact_group"][i])
                    if inputs["pact_sft"][i]:
                        for seq in trace_sequences(TOKENIZER, example):
                            full = reference(input_ids=torch.tensor([seq.input_ids])).logits[0].double()
                            lp = full[:-1].log_softmax(-1).gather(-1, torch.tensor(seq.input_ids[1:])[:, None])[:, 0]
                            sft.append((lp, seq.components[1:], seq.segment_ids[1:], seq.turn_ids[1:]))
        owners = [g for g, (inputs, *_) in enumerate(micro) for owned in inputs["pact_sft"] if owned]
        assert len(owners) == 2  # one trace per prompt group, held once
        pad = torch.nn.utils.rnn.pad_sequence
        batch = PACTBatch(
            response_mask=pad(masks, batch_first=True), rewards=torch.zeros(len(masks), dtype=torch.float64),
            group_ids=torch.stack(groups), logp_po=pad(logp_po, batch_first=True),
            logp_tc=pad(logp_tc, batch_first=True), advantages=torch.stack(adv).double(),
            anchored=torch.stack(anchored),
            sft_logp=pad([s[0] for s in sft], batch_first=True),
            sft_components=pad([torch.tensor(s[1]) for s in sft], batch_first=True),
            sft_segment_ids=pad([torch.tensor(s[2]) for s in sft], batch_first=True),
            sft_turn_ids=pad([torch.tensor(s[3]) for s in sft], batch_first=True))
        batch.old_logp_po, batch.old_logp_tc = batch.logp_po.clone(), batch.logp_tc.clone()
        expected, _ = pact_loss(batch, trainer.pact_config, progress)
        got = sum(loss for _, loss, *_ in micro)
        assert got.item() == pytest.approx(expected.item(), rel=1e-5)  # fp32 model vs float64 reference

    logged = [h for h in trainer.state.log_history if "pact/loss/sft" in h]
    assert len(logged) == 2 and all(h["pact/loss/sft"] > 0 for h in logged)


class Both(PACTGRPOTrainer):
    """Computes TRL's own GRPO loss and ours on the same micro-batch; trains with ours."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pairs = []

    def _compute_loss(self, model, inputs):
        params = [p for p in model.parameters() if p.requires_grad]
        controller = self.entropy_coef, self._last_world_entropy, self._entropy_window_stats
        theirs = GRPOTrainer._compute_loss(self, model, inputs)
        # TRL's adaptive entropy controller moved on; ours must make the same move from the same state
        self.entropy_coef, self._last_world_entropy, self._entropy_window_stats = controller
        ours = super()._compute_loss(model, inputs)
        g_theirs = torch.autograd.grad(theirs, params, retain_graph=True)
        g_ours = torch.autograd.grad(ours, params, retain_graph=True)
        old = inputs.get("old_per_token_logps")
        self.pairs.append((theirs.item(), ours.item(), g_theirs, g_ours, old))
        return ours


@pytest.mark.parametrize("loss_type,beta,pact,extra", [
    pytest.param("grpo", 0.0, {"mode": "grpo"}, {}, id="grpo"),
    pytest.param("grpo", 0.0, {"mode": "pact", "anchor_q": 1.0, "lambda_sft": 0.0}, {},  # every group anchored
                 id="grpo-anchored"),
    pytest.param("bnpo", 0.1, {"mode": "grpo"}, {}, id="bnpo-kl"),
    pytest.param("dr_grpo", 0.0, {"mode": "grpo"}, {}, id="dr_grpo"),
    pytest.param("dapo", 0.0, {"mode": "grpo"}, {}, id="dapo"),
    pytest.param("dapo", 0.0, {"mode": "grpo"}, {"delta": 1.06}, id="dapo-delta"),
    pytest.param("grpo", 0.0, {"mode": "pact", "anchor_q": 1.0, "lambda_sft": 0.0},
                 {"delta": 1.06, "learning_rate": 0.1}, id="grpo-anchored-delta"),
    pytest.param("grpo", 0.0, {"mode": "grpo"}, {"entropy_coef": 0.05}, id="grpo-entropy"),
    pytest.param("dapo", 0.0, {"mode": "pact", "anchor_q": 1.0, "lambda_sft": 0.0}, {"entropy_coef": 0.05},
                 id="dapo-anchored-entropy"),
    pytest.param("dr_grpo", 0.0, {"mode": "grpo"}, {"use_adaptive_entropy": True, "entropy_coef": 0.05,
                                                    "entropy_target": 10.0}, id="dr_grpo-adaptive-entropy-up"),
    pytest.param("bnpo", 0.0, {"mode": "grpo"}, {"use_adaptive_entropy": True, "entropy_coef": 0.05,
                                                 "entropy_target": 1.0}, id="bnpo-adaptive-entropy-down"),
    pytest.param("dapo", 0.0, {"mode": "pact", "anchor_q": 1.0, "lambda_sft": 0.0},
                 {"top_entropy_quantile": 0.3, "entropy_coef": 0.05}, id="dapo-anchored-entropy-mask"),
    pytest.param("grpo", 0.1, {"mode": "grpo"}, {"top_entropy_quantile": 0.5}, id="grpo-kl-entropy-mask"),
    pytest.param("bnpo", 0.0, {"mode": "pact", "anchor_q": 1.0, "lambda_sft": 0.0},
                 {"off_policy_mask_threshold": 0.002}, id="bnpo-anchored-off-policy-mask"),
])
def test_without_the_trace_it_is_trls_grpo_loss(tmp_path, loss_type, beta, pact, extra):
    """With the trace terms off, the loss and its gradients are TRL's own, off-policy (num_iterations=2,
    so ratios move away from 1 and clipping is exercised), with TRL's KL term, TRL's two-sided clipping
    (delta, PACT's dual clip), its entropy bonus (static and adaptive), its entropy mask and its off-policy
    sequence mask."""
    args = _args(tmp_path, **{**dict(loss_type=loss_type, beta=beta, num_iterations=2, max_steps=3,
                                     learning_rate=0.05, epsilon=0.05), **extra})
    trainer = _train_both(tmp_path, args, pact)
    clipped = [h.get("pact/po/clip_frac_low", 0) + h.get("pact/po/clip_frac_high", 0)
               for h in trainer.state.log_history]
    assert max(clipped) > 0  # the clipped branch was taken somewhere
    if "delta" in extra:
        assert trainer.pact_config.dual_clip == extra["delta"]
        assert max(h.get("pact/po/dual_clip_frac", 0) for h in trainer.state.log_history) > 0
    if extra.get("use_adaptive_entropy"):  # entropy ~ log(vocab) ~ 5: below a target of 10, above one of 1
        step = args.entropy_coef_delta if args.entropy_target > 5 else -args.entropy_coef_delta
        assert trainer.entropy_coef == pytest.approx(args.entropy_coef + args.max_steps * step)
        applied = [h["pact/entropy_coef"] for h in trainer.state.log_history if "pact/entropy_coef" in h]
        assert applied[0] == 0.0  # no measured entropy yet: no bonus in the first step
        assert max(applied) > 0 if step > 0 else max(applied) == 0.0
    elif "entropy_coef" in extra:
        assert all(h["pact/entropy_coef"] == extra["entropy_coef"] for h in trainer.state.log_history
                   if "pact/entropy_coef" in h)
    if "off_policy_mask_threshold" in extra:  # some negative-advantage rollout was dropped
        assert min(h.get("pact/off_policy_kept", 1) for h in trainer.state.log_history) < 1


class OneCompletionMasked(Both):
    """A micro-batch whose first completion is masked out entirely, as ``mask_truncated_completions`` masks a
    truncated one."""

    def _compute_loss(self, model, inputs):
        mask = inputs["completion_mask"].clone()
        mask[0] = 0
        return super()._compute_loss(model, {**inputs, "completion_mask": mask})


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "bnpo", "dapo"])
def test_a_masked_out_completion_counts_as_trl_counts_it(tmp_path, loss_type):
    """TRL's grpo and dr_grpo divide by every row of a micro-batch, an empty one included (PACT's seq-means
    count the non-empty ones: a micro-batch with one masked completion got 2x TRL's loss and gradient)."""
    args = _args(tmp_path, loss_type=loss_type, beta=0.0, num_iterations=1, max_steps=1, learning_rate=0.05)
    trainer = _train_both(tmp_path, args, {"mode": "grpo"}, cls=OneCompletionMasked, old=False)
    assert all(theirs != 0 for theirs, *_ in trainer.pairs)


def _train_both(tmp_path, args, pact, cls=Both, old=True):
    """Trains with ``cls`` (a ``Both``) and checks every micro-batch's loss and gradients against TRL's."""
    model_dir = tmp_path / "model"  # TRL loads its reference model (beta > 0) from the policy's path
    tiny_causal_lm("llama", vocab_size=len(TOKENIZER)).save_pretrained(model_dir)
    trainer = cls(model=str(model_dir), reward_funcs=_reward, args=args, train_dataset=Dataset.from_list(_rows(6)),
                  processing_class=TOKENIZER, pact_config=pact_config_from_grpo_args(args, **pact))
    trainer.train()
    assert len(trainer.pairs) == 2 * args.max_steps
    assert not old or any(old_logp is not None for *_, old_logp in trainer.pairs)
    for theirs, ours, g_theirs, g_ours, _ in trainer.pairs:
        assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-7)
        for a, b in zip(g_theirs, g_ours):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)
    return trainer


class SampledByVLLM(Both):
    """As if vLLM had sampled the rollouts: TRL's importance-sampling ratios (here a fixed function of the
    tokens, per token or per sequence) reach the loss, and use_vllm is on only while the losses are computed
    (generation stays local)."""

    def _compute_loss(self, model, inputs):
        ratio = 0.5 + (inputs["completion_ids"] % 5).float() / 4  # [B, T] in [0.5, 1.5]
        token_level = self.vllm_importance_sampling_mode.startswith("token")
        inputs["importance_sampling_ratio"] = ratio if token_level else ratio[:, :1]
        self.use_vllm = True
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self.use_vllm = False


@pytest.mark.parametrize("mode", ["token_truncate", "sequence_mask"])
def test_vllm_importance_sampling_correction_weighs_both_surrogates_as_trl(tmp_path, mode):
    args = _args(tmp_path, num_iterations=2, max_steps=2, learning_rate=0.05, epsilon=0.05,
                 vllm_importance_sampling_mode=mode)
    assert args.vllm_importance_sampling_correction  # TRL's default
    _train_both(tmp_path, args, {"mode": "pact", "anchor_q": 1.0, "lambda_sft": 0.0}, cls=SampledByVLLM)


class WithToolResponses(Both):
    """As if TRL's tool loop had spliced a tool response into every completion: its ``tool_mask`` is 0 on
    completion tokens 2..4. Also checks, in every micro-batch, that no token it marks gets a policy gradient
    in either context."""

    def _compute_loss(self, model, inputs):
        tool_mask = torch.ones_like(inputs["completion_mask"])
        tool_mask[:, 2:5] = 0
        inputs["tool_mask"] = tool_mask
        batch = self.pact_batch(model, inputs).batch
        loss, _ = pact_loss(batch, self.pact_config, self.pact_progress())
        scored = [t for t in (batch.logp_tc, batch.logp_po) if t is not None]  # logp_tc: mode pact only
        for grad in torch.autograd.grad(loss, scored, allow_unused=True):
            assert grad is None or not grad[:, 2:5].any()
        self.checked_tool_tokens = getattr(self, "checked_tool_tokens", 0) + 1
        return super()._compute_loss(model, inputs)


@pytest.mark.parametrize("pact", [pytest.param({"mode": "grpo"}, id="grpo"),
                                  pytest.param({"mode": "pact", "anchor_q": 0.5}, id="pact")])
def test_tool_response_tokens_get_no_policy_gradient(tmp_path, pact):
    """TRL's tool_mask (multi-turn tool use) leaves tool responses out of both surrogates, the KL and the entropy
    bonus; with the trace terms off the loss is TRL's own (``_train_both`` compares only then)."""
    args = _args(tmp_path, num_iterations=2, max_steps=2, learning_rate=0.05, epsilon=0.05, beta=0.1,
                 entropy_coef=0.01)
    if pact["mode"] == "grpo":
        trainer = _train_both(tmp_path, args, pact, cls=WithToolResponses)
    else:
        model_dir = tmp_path / "model"
        tiny_causal_lm("llama", vocab_size=len(TOKENIZER)).save_pretrained(model_dir)
        trainer = WithToolResponses(model=str(model_dir), reward_funcs=_reward, args=args,
                                    train_dataset=Dataset.from_list(_rows()), processing_class=TOKENIZER,
                                    pact_config=pact_config_from_grpo_args(args, **pact))
        trainer.train()
    assert trainer.checked_tool_tokens == 2 * args.max_steps


# TRL parses tool calls with a response template; this one reads the built-in template's
# "<tool_call> name ( key = value , ... ) </tool_call>".
BUILTIN_RESPONSE_TEMPLATE = {
    "defaults": {"role": "assistant"},
    "start_anchor": "<|im_start|> assistant",
    "fields": {
        "reasoning_content": {"open": "<think>", "close_pattern": r"\s*</think>\s*", "content": "text"},
        "tool_calls": {
            "open_pattern": r"<tool_call>\s*(?P<name>[^\s(]+)\s*\(",
            "close_pattern": r"\)\s*</tool_call>\s*",
            "repeats": True,
            "content": "xml-inline",
            "content_args": {"tag_pattern": r"(?P<key>[^\s=,]+)\s*=\s*(?P<value>[^,]*?)\s*(?=,|$)",
                             "value_parser": {"name": "text"}},
            "transform": {"type": "function", "function": {"name": "{name}", "arguments": "{content}"}},
        },
        "content": {"close_pattern": r"\s*<\|im_end\|>\s*", "content": "text"},
    },
}


def lookup(entity: str, relation: str) -> str:
    """Look up a relation of an entity.

    Args:
        entity: the entity
        relation: the relation
    """
    return "wayne"


class CallsATool(PACTGRPOTrainer):
    """The first turn of every rollout calls ``lookup`` (as TRL's own tool test patches generation); TRL runs the
    tool, appends its response and generates on. Checks each micro-batch's tool mask and gradients."""

    CALL = " <tool_call> lookup ( entity = ivan , relation = employer ) </tool_call> <|im_end|>"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tool_tokens = []

    def _generate_single_turn(self, prompt_ids, *args, **kwargs):
        response = self._tokenizer.convert_tokens_to_ids("<tool_response>")
        if any(response in ids for ids in prompt_ids):  # after the tool: the model goes on
            return super()._generate_single_turn(prompt_ids, *args, **kwargs)
        call = self._tokenizer(self.CALL, add_special_tokens=False)["input_ids"]
        return [list(call) for _ in prompt_ids], None

    def _compute_loss(self, model, inputs):
        tool = inputs["completion_mask"].bool() & ~inputs["tool_mask"].bool()  # [B, T] the spliced tool response
        self.tool_tokens.append([self._tokenizer.decode(row[m]) for row, m in zip(inputs["completion_ids"], tool)])
        batch = self.pact_batch(model, inputs).batch
        loss, _ = pact_loss(batch, self.pact_config, self.pact_progress())
        g_tc, g_po = torch.autograd.grad(loss, [batch.logp_tc, batch.logp_po], allow_unused=True)
        for grad in (g_tc, g_po):
            assert grad is None or not grad[tool].any()
        assert any(g is not None and g[~tool & batch.response_mask.bool()].any() for g in (g_tc, g_po))
        return super()._compute_loss(model, inputs)


def test_multi_turn_tool_calls(tmp_path):
    """TRL's tools= loop under PACT: the tool's response spliced into each rollout gets no policy gradient in
    either context, the model's own tokens around it do, and the trace's tool calls get the SFT loss."""
    tokenizer = copy.deepcopy(TOKENIZER)
    tokenizer.response_template = BUILTIN_RESPONSE_TEMPLATE
    args = _args(tmp_path, max_completion_length=24, num_iterations=2, max_steps=2)
    def reward(completions, **kwargs):  # of the last message, the model's turn after the tool's response
        return [float(len(c[-1]["content"])) for c in completions]

    trainer = CallsATool(model=tiny_causal_lm("llama", vocab_size=len(tokenizer)), reward_funcs=reward, args=args,
                         train_dataset=Dataset.from_list(_rows()), processing_class=tokenizer, tools=[lookup])
    trainer.train()
    assert len(trainer.tool_tokens) == 4
    assert all("wayne" in text for micro in trainer.tool_tokens for text in micro)
    tool_calls = [h["pact/sft_weight/tool_call"] for h in trainer.state.log_history if "pact/sft_weight/tool_call" in h]
    assert tool_calls and all(w > 0 for w in tool_calls)


class CountsForwards(PACTGRPOTrainer):
    """Counts the model forwards of each micro-batch's loss."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.forwards, self.old_tc = [], []

    def _compute_loss(self, model, inputs):
        calls = []
        handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            handle.remove()
        self.forwards.append(len(calls))
        self.old_tc.append("pact_old_logp_tc" in inputs)
        return loss


@pytest.mark.parametrize("pact,forwards", [
    pytest.param({"mode": "pact"}, 3, id="pact"),
    pytest.param({"mode": "pact", "lambda_sft": 0.0}, 2, id="pact-without-sft"),
    pytest.param({"mode": "grpo"}, 1, id="grpo"),
    pytest.param({"mode": "sft"}, 2, id="sft"),
])
def test_only_the_contexts_the_loss_uses_are_scored(tmp_path, pact, forwards):
    """Mode grpo costs what TRL's step costs: one forward, and no old trace-conditioned log-probs."""
    args = _args(tmp_path, num_iterations=2, max_steps=2)
    trainer = CountsForwards(model=tiny_causal_lm("llama", vocab_size=len(TOKENIZER)), reward_funcs=_reward,
                             args=args, train_dataset=Dataset.from_list(_rows()), processing_class=TOKENIZER,
                             pact_config=pact_config_from_grpo_args(args, **pact))
    trainer.train()
    assert trainer.forwards == [forwards] * 4
    assert all(trainer.old_tc) == (pact["mode"] == "pact") and any(trainer.old_tc) == (pact["mode"] == "pact")


def test_training_with_pact_changes_the_model(tmp_path):
    model = tiny_causal_lm("llama", vocab_size=len(TOKENIZER))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = PACTGRPOTrainer(model=model, reward_funcs=_reward, args=_args(tmp_path, max_steps=1),
                              train_dataset=Dataset.from_list(_rows()), processing_class=TOKENIZER)
    trainer.train()
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


@pytest.mark.parametrize("row,message", [
    ({"prompt": [{"role": "user", "content": "q"}]}, "has no 'trace'"),
    ({"prompt": [{"role": "user", "content": "q"}], "trace": "[{"}, "not valid JSON"),
    ({"prompt": None, "trace": "[]"}, "a string or a list of messages, got NoneType"),
    ({"prompt": [{"role": "user", "content": "q"}], "trace": json.dumps([{"role": "tool", "content": "x",
                                                                          "tool_call_id": "c9"}])},
     "answers no earlier tool call"),
])
def test_bad_rows_fail_at_construction_naming_the_row(tmp_path, row, message):
    rows = _rows()
    rows[2] = row
    with pytest.raises(DataFormatError, match=message) as info:
        PACTGRPOTrainer(model=tiny_causal_lm("llama", vocab_size=len(TOKENIZER)), reward_funcs=_reward,
                        args=_args(tmp_path), train_dataset=Dataset.from_list(_rows()),
                        eval_dataset={"held": Dataset.from_list(rows)}, processing_class=TOKENIZER)
    assert "eval_dataset['held'] row 2" in str(info.value)


def test_a_text_trace_is_one_assistant_turn(tmp_path):
    """TRL's standard format end to end: string prompts and string traces (the expert's answer)."""
    rows = [{"prompt": r["prompt"][-1]["content"], "trace": json.loads(r["trace"])[-1]["content"]} for r in _rows()]
    trainer = Recording(model=tiny_causal_lm("llama", vocab_size=len(TOKENIZER)), reward_funcs=_reward,
                        args=_args(tmp_path, max_steps=1), train_dataset=Dataset.from_list(rows),
                        processing_class=TOKENIZER)
    trainer.train()
    example = trainer._pact_example(rows[0], "row 0")
    assert example.trace == [{"role": "assistant", "content": rows[0]["trace"]}]
    texts = [TOKENIZER.decode(inputs["pact_tc_prompt_ids"][i]) for inputs, *_ in trainer.records
             for i in range(len(inputs["pact_tc_prompt_ids"]))]
    assert all("answer :" in text for text in texts)
    assert max(h.get("pact/loss/sft", 0) for h in trainer.state.log_history) > 0


def test_a_data_set_without_traces_fails_at_construction(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "trace"} for r in _rows()]
    with pytest.raises(DataFormatError, match="train_dataset row 0 has no 'trace' column"):
        PACTGRPOTrainer(model=tiny_causal_lm("llama", vocab_size=len(TOKENIZER)), reward_funcs=_reward,
                        args=_args(tmp_path), train_dataset=Dataset.from_list(rows), processing_class=TOKENIZER)


def test_a_trace_the_template_cannot_render_fails_at_construction(tmp_path):
    tokenizer = copy.deepcopy(TOKENIZER)
    tokenizer.chat_template = ("{%- for m in messages if 'UNRENDERABLE' in (m.reasoning_content or '') -%}"
                               "{{ raise_exception('this reasoning cannot be rendered') }}{%- endfor -%}"
                               + TOKENIZER.chat_template)
    rows = _rows()
    trace = json.loads(rows[1]["trace"])
    trace[0]["reasoning_content"] = "UNRENDERABLE"
    rows[1]["trace"] = json.dumps(trace)
    with pytest.raises(DataFormatError, match="train_dataset row 1: the trace does not render .*cannot be rendered"):
        PACTGRPOTrainer(model=tiny_causal_lm("llama", vocab_size=len(tokenizer)), reward_funcs=_reward,
                        args=_args(tmp_path), train_dataset=Dataset.from_list(rows), processing_class=tokenizer)


def test_string_prompts_train_with_the_trace_after_the_prompt_text(tmp_path):
    """TRL's standard format: the prompt-only rollouts come from the raw prompt string, the trace-conditioned
    prompt is that string followed by the rendered trace (no template, as TRL tokenizes strings), and the SFT
    sequences render the prompt as one user message."""
    rows = [{"prompt": r["prompt"][-1]["content"], "trace": r["trace"]} for r in _rows()]
    trainer = Recording(model=tiny_causal_lm("llama", vocab_size=len(TOKENIZER)), reward_funcs=_reward,
                        args=_args(tmp_path, max_steps=1), train_dataset=Dataset.from_list(rows),
                        processing_class=TOKENIZER)
    trainer.train()
    template = trainer.trace_template
    by_prompt = {tuple(TOKENIZER(r["prompt"])["input_ids"]): r for r in rows}
    for inputs, loss, *_ in trainer.records:
        assert torch.isfinite(loss)
        for i in range(inputs["prompt_ids"].shape[0]):
            row = by_prompt[tuple(_unpad(inputs["prompt_ids"][i], inputs["prompt_mask"][i]))]
            text = row["prompt"] + template.separator + template.render(json.loads(row["trace"]))
            assert _unpad(inputs["pact_tc_prompt_ids"][i], inputs["pact_tc_prompt_mask"][i]) == \
                TOKENIZER(text)["input_ids"]
            if inputs["pact_sft"][i]:
                example = parse_example({"id": "x", "messages": [{"role": "user", "content": row["prompt"]}],
                                         "trace": json.loads(row["trace"])})
                assert [s.input_ids for s in inputs["pact_sft"][i]] == \
                    [s.input_ids for s in trace_sequences(TOKENIZER, example)]


def test_every_grpo_config_field_is_classified():
    """Each GRPOConfig field is implemented, left to TRL, refused, or without effect on the loss: a TRL release
    that adds (or drops) a field fails here until the adapter decides what it means under PACT."""
    sets = {"PACT_FIELDS": adapter.PACT_FIELDS, "TRL_FIELDS": adapter.TRL_FIELDS,
            "REFUSED_FIELDS": adapter.REFUSED_FIELDS, "NO_LOSS_EFFECT_FIELDS": adapter.NO_LOSS_EFFECT_FIELDS}
    names = {f.name for f in dataclasses.fields(GRPOConfig)}
    classified = set().union(*sets.values())
    assert not names - classified, f"GRPOConfig fields nobody classified: {sorted(names - classified)}"
    assert not classified - names, f"classified fields GRPOConfig no longer has: {sorted(classified - names)}"
    for a in sets:
        for b in sets:
            assert a == b or not sets[a] & sets[b], f"{a} and {b} share {sorted(sets[a] & sets[b])}"


def _construct(tmp_path, overrides=None, pact=None, scoring="padded", model=None):
    args = _args(tmp_path, **(overrides or {}))
    config = None if pact is None else pact_config_from_grpo_args(_args(tmp_path), **pact)
    return PACTGRPOTrainer(model=model or tiny_causal_lm("llama", vocab_size=len(TOKENIZER)), reward_funcs=_reward,
                           args=args, train_dataset=Dataset.from_list(_rows()), processing_class=TOKENIZER,
                           pact_config=config, scoring=scoring)


@pytest.mark.parametrize("overrides,pact,scoring,message", [
    pytest.param({"loss_type": "cispo"}, None, "padded", "loss_type='cispo'", id="cispo"),
    pytest.param({"loss_type": "sapo"}, {}, "padded", "loss_type='sapo'", id="sapo"),
    pytest.param({"importance_sampling_level": "sequence"}, {}, "padded", "importance_sampling_level",
                 id="sequence-is"),
    pytest.param({"delta": 1.1}, None, "padded", "delta=1.1 <= 1 \\+ epsilon_high", id="delta-small"),
    pytest.param({"delta": 1.5}, {}, "padded", "pact_config.dual_clip=None disagrees with GRPOConfig's delta",
                 id="delta-dropped-by-own-config"),
    pytest.param({"epsilon": 0.1}, {}, "padded", "pact_config.clip_eps_low=0.2 disagrees", id="epsilon-dropped"),
    pytest.param({"entropy_coef": 0.01}, {"c_ent": 0.01}, "padded", "two entropy bonuses", id="two-entropy-bonuses"),
    pytest.param({}, {"beta_kl": 0.1}, "padded", "beta_kl=0.1 disagrees with GRPOConfig's beta", id="kl-without-ref"),
    pytest.param({}, {}, "tree", "scoring=", id="scoring"),
    pytest.param({"cast_lm_head_to_fp32": True}, {}, "packed", "cast_lm_head_to_fp32", id="fp32-head-packed"),
    # the advantages are GRPOTrainer's (scale_rewards): PACT's own advantage options were silently unused
    pytest.param({}, {"norm_adv_by_std": False}, "padded", "pact_config.norm_adv_by_std=False: .*scale_rewards",
                 id="adv-no-std"),
    pytest.param({}, {"adv_eps": 1e-4}, "padded", "pact_config.adv_eps=0.0001: .*scale_rewards", id="adv-eps"),
])
def test_unsupported_options_are_refused_at_construction(tmp_path, overrides, pact, scoring, message):
    with pytest.raises(ValueError, match=message):
        _construct(tmp_path, overrides, pact, scoring)


def test_delta_maps_onto_the_dual_clip_only_above_the_upper_clip(tmp_path):
    assert pact_config_from_grpo_args(_args(tmp_path, delta=1.5, epsilon_high=0.28)).dual_clip == 1.5
    with pytest.raises(ValueError, match="delta=1.28 must exceed 1 \\+ epsilon_high"):
        pact_config_from_grpo_args(_args(tmp_path, delta=1.28, epsilon_high=0.28))


def test_moe_router_loss_is_refused_with_packed_scoring(tmp_path):
    """TRL adds a MoE model's load-balancing loss by default (the config's coefficient); the packed pass has none."""
    with pytest.raises(ValueError, match="router_aux_loss_coef=0.001 .* with scoring='packed'"):
        _construct(tmp_path, scoring="packed", model=tiny_moe_lm(len(TOKENIZER)))


@pytest.mark.parametrize("coef", [pytest.param(None, id="config-coef"), pytest.param(0.5, id="coef-0.5"),
                                  pytest.param(0.0, id="off")])
def test_moe_router_loss_is_added_as_trl_adds_it(tmp_path, coef):
    """Trace terms off (mode grpo): only the prompt-only rollouts are scored, and the loss with its router
    loss and gradients is TRL's own."""
    args = _args(tmp_path, router_aux_loss_coef=coef, num_iterations=2, max_steps=2, learning_rate=0.05)
    trainer = Both(model=tiny_moe_lm(len(TOKENIZER)), reward_funcs=_reward, args=args,
                   train_dataset=Dataset.from_list(_rows()), processing_class=TOKENIZER,
                   pact_config=pact_config_from_grpo_args(args, mode="grpo"))
    expected_coef = 0.001 if coef is None else coef
    assert trainer.router_aux_loss_coef == expected_coef and trainer.aux_loss_enabled == (expected_coef > 0)
    trainer.train()
    assert len(trainer.pairs) == 4
    for theirs, ours, g_theirs, g_ours, _ in trainer.pairs:
        assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-7)
        for a, b in zip(g_theirs, g_ours):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)
    assert (len([h for h in trainer.state.log_history if "pact/aux_loss" in h]) == 2) == (expected_coef > 0)


class RouterLosses(PACTGRPOTrainer):
    """Keeps each micro-batch's inputs, weights and the router loss the adapter computed for it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records = []

    def _compute_loss(self, model, inputs):
        aux = self.pact_batch(model, inputs).aux_loss.item()
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.records.append((inputs, weights, aux))
        return super()._compute_loss(model, inputs)


def _router_loss(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask, output_router_logits=True).aux_loss


def test_moe_router_loss_averages_the_forwards_of_every_context(tmp_path):
    """Under PACT the router loss is the mean over the adapter's forwards (prompt-only rollouts,
    trace-conditioned rollouts, traces), each recomputed here by a plain forward of the model."""
    args = _args(tmp_path, router_aux_loss_coef=0.5, max_steps=2)
    trainer = RouterLosses(model=tiny_moe_lm(len(TOKENIZER)), reward_funcs=_reward, args=args,
                           train_dataset=Dataset.from_list(_rows()), processing_class=TOKENIZER)
    trainer.train()
    assert len(trainer.records) == 4
    model = trainer.model
    pad = torch.nn.utils.rnn.pad_sequence
    n_with_traces = 0
    for inputs, weights, aux in trainer.records:
        model.load_state_dict(weights)
        with torch.no_grad():
            completion = inputs["completion_ids"], inputs["completion_mask"]
            parts = [_router_loss(model, torch.cat([inputs[f"{prefix}prompt_ids"], completion[0]], 1),
                                  torch.cat([inputs[f"{prefix}prompt_mask"], completion[1]], 1))
                     for prefix in ("", "pact_tc_")]
            traces = [torch.tensor(s.input_ids) for owned in inputs["pact_sft"] for s in owned]
            if traces:
                n_with_traces += 1
                parts.append(_router_loss(model, pad(traces, batch_first=True, padding_value=TOKENIZER.pad_token_id),
                                          pad([torch.ones_like(t) for t in traces], batch_first=True)))
        assert aux == pytest.approx(torch.stack(parts).mean().item(), rel=1e-5)
    assert n_with_traces  # TRL shuffles a generation batch's rows over its micro-batches


def test_refusals_come_one_per_line(tmp_path):
    with pytest.raises(ValueError) as info:
        _construct(tmp_path, {"delta": 1.1, "importance_sampling_level": "sequence", "loss_type": "sapo"})
    lines = str(info.value).splitlines()[1:]
    assert len(lines) == 3 and all(line.startswith("- ") for line in lines)


def test_remove_unused_columns_keeps_the_trace(tmp_path):
    trainer = _construct(tmp_path, {"remove_unused_columns": True, "max_steps": 1})
    trainer.train()
    assert trainer.state.global_step == 1


class PackedVsPadded(PACTGRPOTrainer):
    """Scores each micro-batch both ways; trains with the packed pass."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, scoring="packed", **kwargs)
        self.checked = 0

    def _compute_loss(self, model, inputs):
        params = [p for p in model.parameters() if p.requires_grad]
        self.scoring = "padded"
        padded = self.pact_batch(model, inputs).batch
        self.scoring = "packed"
        packed = self.pact_batch(model, inputs).batch
        for name in ("logp_po", "logp_tc", "entropy", "sft_logp"):
            torch.testing.assert_close(getattr(packed, name), getattr(padded, name), rtol=1e-5, atol=2e-5)
        progress = self.pact_progress()
        g_padded = torch.autograd.grad(pact_loss(padded, self.pact_config, progress)[0], params)
        g_packed = torch.autograd.grad(pact_loss(packed, self.pact_config, progress)[0], params)
        for a, b in zip(g_padded, g_packed):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
        self.checked += 1
        return super()._compute_loss(model, inputs)


def test_packed_scoring_equals_trls_padded_forwards(tmp_path):
    """One tree-packed forward gives the log-probs, entropies and gradients of TRL's three padded ones."""
    args = _args(tmp_path, num_iterations=2, max_steps=2)
    trainer = PackedVsPadded(model=tiny_causal_lm("qwen3", vocab_size=len(TOKENIZER)), reward_funcs=_reward,
                             args=args, train_dataset=Dataset.from_list(_rows()), processing_class=TOKENIZER,
                             pact_config=pact_config_from_grpo_args(args, c_ent=0.01))
    trainer.train()
    assert trainer.checked == 4


def test_two_ranks_share_a_prompt_group(tmp_path):
    """torchrun, 2 processes (DDP on gloo): a prompt group split across the ranks gets one anchoring draw,
    its trace is held by exactly one row, its SFT term weighs as in one process, and the ranks end with the same
    weights."""
    here = Path(__file__).resolve().parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = f"{here}:{here.parent}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541",
           str(here / "trl_ddp_worker.py"), str(tmp_path)]
    # ranks that disagree on their collectives hang: the timeout turns that into a failure
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for step in (0, 1):
        rows = [row for rank in ranks for row in rank["rows"] if row["step"] == step]
        assert len(rows) == 4 and {row["group"] for row in rows} == {0}
        assert len({row["anchored"] for row in rows}) == 1  # one draw for the group, on both ranks
        assert sorted(row["sft"] > 0 for row in rows) == [False, False, False, True]
        assert len({tuple(row["prompt"]) for row in rows}) == 1  # the ranks did hold one group
        # one micro-batch per rank and step: DDP averages the two ranks' gradients, so a trace weighs
        # sft_scale / (its micro-batch's traces) / 2 in the step, which must be 1 / (the step's traces), as in one
        # process (each rank's own trace count gave the rank holding the trace sft_scale 1: half the SFT term)
        calls = [rank["calls"][step] for rank in ranks]
        assert sum(call["traces"] for call in calls) == 1
        for call in calls:
            if call["traces"]:
                assert call["sft_scale"] / call["traces"] / 2 == pytest.approx(1.0)
    for key, value in ranks[0]["weights"].items():
        assert torch.allclose(torch.tensor(value), torch.tensor(ranks[1]["weights"][key])), key


def test_evaluation_reports_the_pact_loss(tmp_path):
    args = _args(tmp_path, per_device_eval_batch_size=2)
    trainer = PACTGRPOTrainer(model=tiny_causal_lm("llama", vocab_size=len(TOKENIZER)), reward_funcs=_reward,
                              args=args, train_dataset=Dataset.from_list(_rows()),
                              eval_dataset=Dataset.from_list(_rows(2, seed=9)), processing_class=TOKENIZER)
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_pact/loss/total"], rel=1e-6)
    assert metrics["eval_pact/loss/sft"] > 0 and "eval_pact/tc/approx_kl" in metrics
