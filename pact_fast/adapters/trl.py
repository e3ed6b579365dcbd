"""TRL: ``PACTGRPOTrainer``, a ``trl.GRPOTrainer`` whose loss is ``pact_loss`` (tested with trl 1.16).

The dataset is what GRPOTrainer takes, conversational ``prompt`` rows, plus a ``trace`` column: the
expert trace as messages in pact_fast's data format (``pact_fast/data.py``): assistant turns with
``reasoning_content`` and ``tool_calls``, tool responses, as a list or a JSON string. Reward
functions see the ``trace`` column among their keyword arguments, as GRPOTrainer passes every column.

What the subclass adds to GRPOTrainer, which samples and scores rollouts prompt-only as usual:

- after generation (``_generate_and_score_completions``): the trace-conditioned prompt of every
  rollout, rendered with the trainer's own chat template and tools (``pact_tc_prompt_ids``); one
  Bernoulli(q) anchoring draw per prompt group, the same on every rank (``pact_anchored``); the old
  policy's trace-conditioned log-probs when TRL keeps old prompt-only ones (``pact_old_logp_tc``);
  each group's trace tokenized with component labels, held by the group's first rollout
  (``pact_sft``, and their count ``pact_n_sft``);
- the loss (``_compute_loss``): TRL's own log-prob path (its fused LM head) on the prompt-only
  rollouts, on the trace-conditioned rollouts and on the traces, then ``pact_loss``. The RL terms are
  normalised as TRL normalises its ``loss_type`` (``pact_config_from_grpo_args`` maps it to
  ``loss_agg``); the SFT term is scaled so that each trace sequence of a generation batch counts once
  per optimizer step.

``scoring="padded"`` (the default) runs these as three padded forwards per micro-batch;
``scoring="packed"`` runs one tree-packed forward of the micro-batch (``pact_fast.scoring``): each
prompt, each trace-conditioned prompt and each trace prefix goes through the model once, as in
``pact-fast train``. It needs a model whose attention goes through transformers' AttentionInterface
(Llama, Qwen2, Qwen3, Mistral, ...) and, for now, one process.

Options of GRPOTrainer that change the surrogate itself (``loss_type`` cispo / sapo / vespo / luspo,
the off-policy mask, the entropy mask, sequence-level importance sampling, vLLM importance-sampling
correction) are refused at construction. TRL's multi-turn tool loop works through its ``tool_mask``
(tool responses are never RL targets), but the tests run single-turn: TRL parses tool calls only
with a response schema for the chat template, which the built-in word-level template lacks.
"""
import json

import torch
from trl import GRPOTrainer

from ..chat import TraceContextTemplate, trace_conditioned_messages, trace_sequences
from ..data import DataFormatError, parse_example
from ..losses import PACTBatch, PACTLossConfig, anchor_rows, loss_scales, pact_loss
from ..packing import pad_rows
from ..scoring import sequence_logprobs

# GRPOConfig.loss_type -> PACTLossConfig.loss_agg. grpo / bnpo / dr_grpo reduce each micro-batch; dapo (TRL's
# default) is a token mean over the whole generation batch, made here from micro-batch means (``_rl_scale``).
LOSS_AGG = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm",
            "dapo": "token-mean"}


def pact_config_from_grpo_args(args, **overrides):
    """A ``PACTLossConfig`` carrying a ``GRPOConfig``'s clipping, KL term and loss aggregation."""
    if args.loss_type not in LOSS_AGG:
        raise ValueError(f"PACTGRPOTrainer: GRPOConfig.loss_type={args.loss_type!r} has no PACT counterpart; "
                         f"choose one of {sorted(LOSS_AGG)}")
    values = dict(clip_eps_low=args.epsilon,
                  clip_eps_high=args.epsilon_high if args.epsilon_high is not None else args.epsilon,
                  beta_kl=args.beta, kl_estimator="k3", kl_ratio_weighted=args.use_bias_correction_kl,
                  loss_agg=LOSS_AGG[args.loss_type])
    if args.loss_type == "dr_grpo":
        values["loss_scale_factor"] = args.max_completion_length
    values.update(overrides)
    return PACTLossConfig(**values)


def _unpadded(ids, mask):
    """ids, mask: [B, P]. Returns the B lists of ids where mask is 1."""
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]



class PACTGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` trained with the PACT objective.

    Args (besides GRPOTrainer's, all keyword):
        pact_config: ``PACTLossConfig``; default: PACT defaults with GRPOConfig's ``epsilon``,
            ``epsilon_high``, ``beta`` (k3 KL) and ``loss_type`` carried over (``pact_config_from_grpo_args``).
        trace_template: ``TraceContextTemplate`` writing the trace into the privileged prompt.
        scoring: ``"padded"`` (TRL's forward, three per micro-batch) or ``"packed"`` (one tree-packed forward).
    """

    def __init__(self, *args, pact_config=None, trace_template=None, scoring="padded", **kwargs):
        super().__init__(*args, **kwargs)
        self.pact_config = pact_config or pact_config_from_grpo_args(self.args)
        self.trace_template = trace_template or TraceContextTemplate()
        self.scoring = scoring
        refused = []
        if scoring not in ("padded", "packed"):
            refused.append(f"scoring={scoring!r} (use 'padded' or 'packed')")
        if scoring == "packed" and self.accelerator.num_processes > 1:
            refused.append("scoring='packed' with more than one process (use 'padded')")
        if self.pact_config.beta_kl > 0 and self.beta == 0.0:
            refused.append("pact_config.beta_kl > 0 needs GRPOConfig(beta > 0) so that TRL keeps a reference model")
        if self.args.loss_type not in LOSS_AGG:
            refused.append(f"loss_type={self.args.loss_type!r} (use one of {sorted(LOSS_AGG)})")
        if self.off_policy_mask_threshold is not None:
            refused.append("off_policy_mask_threshold")
        if self.top_entropy_quantile < 1.0:
            refused.append("top_entropy_quantile < 1")
        if self.importance_sampling_level != "token":
            refused.append("importance_sampling_level='sequence'")
        if self.use_vllm and self.vllm_importance_sampling_correction:
            refused.append("vllm_importance_sampling_correction (set it False)")
        if self._is_vlm:
            refused.append("vision-language models (text only)")
        if refused:
            raise ValueError("PACTGRPOTrainer does not support: " + "; ".join(refused))

    # ------------------------------------------------------------ generation side

    def _pact_example(self, row, index):
        trace = row.get("trace")
        if trace is None:
            raise DataFormatError(f"PACTGRPOTrainer: dataset row {index} has no 'trace' column")
        if isinstance(trace, str):
            try:
                trace = json.loads(trace)
            except json.JSONDecodeError as exc:
                raise DataFormatError(f"PACTGRPOTrainer: row {index}: 'trace' is not valid JSON ({exc.msg})") from None
        prompt = row["prompt"]
        if not isinstance(prompt, list):
            raise DataFormatError(f"PACTGRPOTrainer: row {index}: 'prompt' must be a list of messages "
                                  "(conversational); the trace is rendered with the chat template")
        try:
            example = parse_example({"id": str(index), "messages": prompt, "trace": trace})
        except DataFormatError as exc:
            raise DataFormatError(f"PACTGRPOTrainer: row {index}: {exc}") from None
        example.tools = self.tools or []
        return example

    def _template_kwargs(self):
        kwargs = dict(self.chat_template_kwargs)
        if self.chat_template is not None:
            kwargs["chat_template"] = self.chat_template
        return kwargs

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        device = output["prompt_ids"].device
        B = len(inputs)
        examples = [self._pact_example(row, i) for i, row in enumerate(inputs)]

        tc_ids, _, _ = self._tokenize_prompts([trace_conditioned_messages(ex, self.trace_template) for ex in examples])
        tc_rows = [list(r) for r in tc_ids]
        tc_prompt_ids = pad_rows(tc_rows, value=self._tokenizer.pad_token_id, left=True, device=device)  # [B, P]
        tc_prompt_mask = pad_rows([[1] * len(r) for r in tc_rows], left=True, device=device)  # [B, P]
        output["pact_tc_prompt_ids"], output["pact_tc_prompt_mask"] = tc_prompt_ids, tc_prompt_mask

        # prompt groups are runs of num_generations rows of the global generation batch
        n_gen = self.num_generations if self.model.training else self.num_generations_eval
        global_index = self.accelerator.process_index * B + torch.arange(B)
        group = global_index // n_gen
        n_groups = -(-self.accelerator.num_processes * B // n_gen)
        output["pact_anchored"] = anchor_rows(group, n_groups, self.pact_config.anchor_q, self.pact_config.seed,
                                              self.state.global_step).to(device)
        output["pact_group"] = group.to(device)

        if output.get("old_per_token_logps") is not None:
            completion_ids, completion_mask = output["completion_ids"], output["completion_mask"]
            with torch.no_grad():
                output["pact_old_logp_tc"], _, _ = self._get_per_token_logps_and_entropies(
                    self.model, torch.cat([tc_prompt_ids, completion_ids], 1),
                    torch.cat([tc_prompt_mask, completion_mask], 1), completion_ids.size(1),
                    batch_size=self.args.per_device_train_batch_size)

        owner = (global_index % n_gen == 0).tolist()
        output["pact_sft"] = [trace_sequences(self._tokenizer, ex, **self._template_kwargs()) if own and ex.trace
                              else [] for ex, own in zip(examples, owner)]
        output["pact_n_sft"] = torch.tensor(float(sum(len(s) for s in output["pact_sft"])), device=device)
        return output

    # ------------------------------------------------------------ loss side

    def _pact_logps(self, model, prompt_ids, prompt_mask, completion_ids, completion_mask, entropy=False):
        return self._get_per_token_logps_and_entropies(
            model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1),
            completion_ids.size(1), compute_entropy=entropy)[:2]

    def _packed_logps(self, model, inputs, sequences):
        """One tree-packed forward of the prompt-only rollouts, the trace-conditioned rollouts and the traces.

        Returns (logp_po [B, T], entropy [B, T] or None, logp_tc [B, T], sft_logp [S, E - 1] or None)."""
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        B, T = completion_ids.shape
        completions = _unpadded(completion_ids, completion_mask)  # TRL's completion masks are prefixes
        contexts = [_unpadded(inputs["prompt_ids"], inputs["prompt_mask"]),
                    _unpadded(inputs["pact_tc_prompt_ids"], inputs["pact_tc_prompt_mask"])]
        seqs = [ctx[i] + completions[i] for ctx in contexts for i in range(B)] + [s.input_ids for s in sequences]
        with_entropy = self.pact_config.c_ent > 0
        with self.accelerator.autocast():  # the mixed precision TRL's own forward runs under
            out = sequence_logprobs(model, seqs, temperature=self.temperature, return_entropy=with_entropy)
        logp, ent = zip(*out) if with_entropy else (out, None)

        def completion_part(values, k, context):  # values of tokens 1..n-1 -> the completion's tokens
            start = len(context) - 1
            return values[k][start:start + len(completions[k % B])]

        logp_po = pad_rows([completion_part(logp, i, contexts[0][i]) for i in range(B)], T)
        logp_tc = pad_rows([completion_part(logp, B + i, contexts[1][i]) for i in range(B)], T)
        entropy = pad_rows([completion_part(ent, i, contexts[0][i]) for i in range(B)], T) if with_entropy else None
        width = max((len(s.input_ids) - 1 for s in sequences), default=0)
        sft_logp = pad_rows(list(logp[2 * B:]), width) if sequences else None
        return logp_po, entropy, logp_tc, sft_logp

    def _padded_logps(self, model, inputs, sequences):
        """The same as ``_packed_logps`` through TRL's own forward: three padded batches."""
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        logp_po, entropy = self._pact_logps(model, inputs["prompt_ids"], inputs["prompt_mask"], completion_ids,
                                            completion_mask, entropy=self.pact_config.c_ent > 0)
        logp_tc, _ = self._pact_logps(model, inputs["pact_tc_prompt_ids"], inputs["pact_tc_prompt_mask"],
                                      completion_ids, completion_mask)
        # Every rank runs the trace forward, on a 2-token stand-in when it holds no trace: DDP synchronises at
        # each forward, and ranks that ran different numbers of forwards would wait on each other forever.
        rows = [s.input_ids for s in sequences] or [[self._tokenizer.pad_token_id] * 2]
        device = completion_ids.device
        ids = pad_rows(rows, value=self._tokenizer.pad_token_id, device=device)
        attn = pad_rows([[1] * len(r) for r in rows], device=device)
        sft_logp, _ = self._get_per_token_logps_and_entropies(model, ids, attn, ids.size(1) - 1)[:2]
        return logp_po, entropy, logp_tc, sft_logp if sequences else None

    def pact_batch(self, model, inputs):
        """The ``PACTBatch`` of one micro-batch of ``inputs`` (current-policy log-probs carry gradients)."""
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        response_mask = completion_mask if inputs.get("tool_mask") is None else completion_mask * inputs["tool_mask"]
        sequences = [s for owned in inputs["pact_sft"] for s in owned]
        score = self._packed_logps if self.scoring == "packed" else self._padded_logps
        logp_po, entropy, logp_tc, sft_logp = score(model, inputs, sequences)
        old_po = inputs.get("old_per_token_logps")
        old_tc = inputs.get("pact_old_logp_tc")
        advantages = inputs["advantages"]
        batch = PACTBatch(
            # TRL keeps the rewards to itself: with advantages given, rewards only feed a metric we drop
            response_mask=response_mask, rewards=torch.zeros_like(advantages), group_ids=inputs["pact_group"],
            logp_tc=logp_tc, logp_po=logp_po,
            old_logp_tc=logp_tc.detach() if old_tc is None else old_tc,
            old_logp_po=logp_po.detach() if old_po is None else old_po,
            ref_logp=inputs.get("ref_per_token_logps"), entropy=entropy,
            advantages=advantages, anchored=inputs["pact_anchored"])

        device = completion_ids.device
        if sequences:
            batch.sft_logp = sft_logp
            batch.sft_components = pad_rows([s.components for s in sequences], device=device)[:, 1:]
            batch.sft_segment_ids = pad_rows([s.segment_ids for s in sequences], device=device)[:, 1:]
            batch.sft_turn_ids = pad_rows([s.turn_ids for s in sequences], device=device)[:, 1:]
        else:
            empty = torch.zeros((0, 1), dtype=torch.long, device=device)
            batch.sft_logp = torch.zeros((0, 1), device=device)
            batch.sft_components = batch.sft_segment_ids = batch.sft_turn_ids = empty
        return batch

    def pact_progress(self):
        """Training progress s in [0, 1] for the annealing schedules: optimizer steps done / max_steps."""
        return min(self.state.global_step / self.state.max_steps, 1.0) if self.state.max_steps else 0.0

    def _compute_loss(self, model, inputs):
        batch = self.pact_batch(model, inputs)
        training = self.model.training
        accumulation = self.current_gradient_accumulation_steps if training else 1
        # pact_loss averages the SFT term over the micro-batch's trace sequences; this makes every sequence
        # of the generation batch weigh the same in the optimizer step
        per_micro = inputs["pact_n_sft"].item() / (self.args.steps_per_generation if training else 1)
        here = sum(len(owned) for owned in inputs["pact_sft"])
        tokens = None  # TRL's other loss types average each micro-batch; gradient accumulation adds them
        if self.args.loss_type == "dapo":  # a token sum over the generation batch's tokens (per process)
            tokens = inputs["num_items_in_batch"].clamp(min=1.0).item() / self.accelerator.num_processes
            tokens = tokens * accumulation / self.args.steps_per_generation if training else tokens
        rl_scale, sft_scale = loss_scales(batch.response_mask, here, "token-mean", step_tokens=tokens,
                                          step_traces=per_micro * accumulation)
        if tokens is None:
            rl_scale = 1.0 / accumulation
        loss, metrics = pact_loss(batch, self.pact_config, self.pact_progress(), rl_scale=rl_scale,
                                  sft_scale=sft_scale)
        mode = "train" if training else "eval"
        for key, value in metrics.items():
            if key != "reward_mean":  # rewards are TRL's to log; the batch carries advantages only
                self._metrics[mode][f"pact/{key}"].append(value)
        return loss
