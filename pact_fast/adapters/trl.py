"""TRL: ``PACTGRPOTrainer``, a ``trl.GRPOTrainer`` whose loss is ``pact_loss`` (tested with trl 1.16).

The dataset is what GRPOTrainer takes, ``prompt`` rows in the conversational format (messages) or the standard
one (a string: the trace-conditioned prompt is then that string followed by the rendered trace, and the trace's
SFT sequences take the string as one user message), plus a ``trace`` column: the expert trace as messages in
pact_fast's data format (``pact_fast/data.py``): assistant turns with ``reasoning_content`` and ``tool_calls``,
tool responses, as a list or a JSON string; or, in the standard format's spirit, a plain string: the expert's
answer, one assistant turn. Every row of a map-style data set is parsed and rendered at
construction, so a bad row fails there, named. Reward functions see the ``trace`` column among their keyword
arguments, as GRPOTrainer passes every column.

What the subclass adds to GRPOTrainer, which samples and scores rollouts prompt-only as usual:

- after generation (``_generate_and_score_completions``): the trace-conditioned prompt of every
  rollout, rendered with the trainer's own chat template and tools (``pact_tc_prompt_ids``); one
  Bernoulli(q) anchoring draw per prompt group, the same on every rank (``pact_anchored``); the old
  policy's trace-conditioned log-probs when TRL keeps old prompt-only ones (``pact_old_logp_tc``);
  each group's trace tokenized with component labels, held by the group's first rollout
  (``pact_sft``, and their count ``pact_n_sft``);
- the loss (``_compute_loss``): TRL's own log-prob path (its fused LM head) on the prompt-only
  rollouts, on the trace-conditioned rollouts and on the traces (each only when the loss uses it: mode
  grpo scores the prompt-only rollouts alone, as TRL does), then ``pact_loss``. The RL terms are
  normalised as TRL normalises its ``loss_type`` (``pact_config_from_grpo_args`` maps it to
  ``loss_agg``); the SFT term is scaled so that each trace sequence of a generation batch counts once
  per optimizer step. GRPOConfig's token filters (off-policy mask, entropy mask, vLLM importance
  sampling) weigh both contexts' surrogates through the advantages (``_surrogate_filters``); its entropy
  bonus (``_entropy_bonus``) and an MoE model's router loss are added as TRL adds them.

``scoring="padded"`` (the default) runs these as three padded forwards per micro-batch;
``scoring="packed"`` runs one tree-packed forward of the micro-batch (``pact_fast.scoring``): each
prompt, each trace-conditioned prompt and each trace prefix goes through the model once, as in
``pact-fast train``. It needs a model whose attention goes through transformers' AttentionInterface
(Llama, Qwen2, Qwen3, Mistral, ...) and, for now, one process.

Every ``GRPOConfig`` field is in one of four sets below (``PACT_FIELDS``, ``TRL_FIELDS``, ``REFUSED_FIELDS``,
``NO_LOSS_EFFECT_FIELDS``); options that would change the loss in a way PACT does not implement are refused at
construction, one line per field with the alternative (``_pact_refusals``). TRL's multi-turn tool loop
(``tools=``) works through its ``tool_mask``: the tool responses spliced into a rollout are never RL targets in
either context. TRL parses tool calls with the tokenizer's response template, which the caller sets for a chat
template TRL does not know (the tests set one for the built-in word-level template).
"""
import json
from typing import NamedTuple, Optional

import torch
from trl import GRPOTrainer

from ..chat import TraceContextTemplate, render, trace_conditioned_messages, trace_sequences
from ..data import DataFormatError, parse_example
from ..losses import (PACTBatch, PACTLossConfig, advantage_options, anchor_rows, loss_scales, pact_loss,
                      response_counts)
from ..packing import pad_rows
from ..scoring import sequence_logprobs

# GRPOConfig.loss_type -> PACTLossConfig.loss_agg. grpo / bnpo / dr_grpo reduce each micro-batch; dapo (TRL's
# default) is a token mean over the whole generation batch, made here from micro-batch means (``_compute_loss``).
LOSS_AGG = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm",
            "dapo": "token-mean"}

# What PACTGRPOTrainer does with each GRPOConfig field (trl 1.16.0), in four disjoint sets. The tests walk
# dataclasses.fields(GRPOConfig) and fail on a field in none of them, so a TRL release that adds a field fails
# loudly until someone decides here what it means under PACT.
#
# Read by this adapter, with the meaning given where it is used (pact_config_from_grpo_args, _surrogate_filters,
# _entropy_bonus, _compute_loss, _pact_refusals): the clipped surrogate, the KL term, the aggregation, the token
# filters, the entropy bonus, the router loss, the old log-probs of both contexts.
PACT_FIELDS = frozenset({
    "loss_type", "epsilon", "epsilon_high", "delta", "beta", "use_bias_correction_kl", "max_completion_length",
    "num_iterations", "steps_per_generation", "gradient_accumulation_steps", "temperature", "chat_template_kwargs",
    "per_device_train_batch_size", "remove_unused_columns", "cast_lm_head_to_fp32", "entropy_coef",
    "use_adaptive_entropy", "entropy_coef_min", "entropy_coef_max", "entropy_coef_delta", "entropy_target",
    "router_aux_loss_coef", "off_policy_mask_threshold", "top_entropy_quantile",
    "vllm_importance_sampling_correction", "vllm_importance_sampling_mode", "vllm_importance_sampling_clip_max",
    "vllm_importance_sampling_clip_min", "vllm_importance_sampling_cap",
})
# PACTLossConfig fields that pact_config_from_grpo_args derives, and the GRPOConfig fields they come from.
GRPO_SOURCES = {"clip_eps_low": "epsilon", "clip_eps_high": "epsilon_high (or epsilon)", "dual_clip": "delta",
                "beta_kl": "beta", "kl_ratio_weighted": "use_bias_correction_kl", "loss_agg": "loss_type",
                "loss_scale_factor": "loss_type / max_completion_length"}
# Acted on by GRPOTrainer's own machinery, which the adapter keeps as it is: generation (the rollouts stay
# prompt-only), rewards and advantages, reference model, optimizer and schedule, precision, parallelism.
TRL_FIELDS = frozenset({
    # model and generation
    "model_init_kwargs", "trust_remote_code", "disable_dropout", "num_generations", "num_generations_eval",
    "ds3_gather_for_generation", "shuffle_dataset", "pad_to_multiple_of", "generation_batch_size", "top_p", "top_k",
    "min_p", "generation_kwargs", "repetition_penalty", "cache_implementation", "max_tool_calling_iterations",
    "use_transformers_continuous_batching", "transformers_continuous_batching_config", "use_transformers_paged",
    "use_vllm", "vllm_mode", "vllm_model_impl", "vllm_enable_sleep_mode", "vllm_structured_outputs_regex",
    "vllm_server_base_url", "vllm_server_host", "vllm_server_port", "vllm_server_timeout", "vllm_group_port",
    "vllm_gpu_memory_utilization", "vllm_max_model_length", "vllm_tensor_parallel_size",
    # rewards, advantages, completions, reference model
    "reward_weights", "multi_objective_aggregation", "scale_rewards", "mask_truncated_completions",
    "sync_ref_model", "ref_model_mixup_alpha", "ref_model_sync_steps",
    # the Trainer: optimizer, schedule, batches, precision, parallelism, data order
    "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "optim",
    "optim_args", "optim_target_modules", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps",
    "num_train_epochs", "max_steps", "per_device_eval_batch_size", "auto_find_batch_size", "seed", "data_seed",
    "full_determinism", "bf16", "fp16", "bf16_full_eval", "fp16_full_eval", "tf32", "use_cpu", "torch_compile",
    "torch_compile_backend", "torch_compile_mode", "gradient_checkpointing", "gradient_checkpointing_kwargs",
    "activation_checkpointing", "activation_checkpointing_kwargs", "neftune_noise_alpha", "use_liger_kernel",
    "liger_kernel_config", "accelerator_config", "parallelism_config", "deepspeed", "fsdp", "fsdp_config",
    "ddp_backend", "ddp_broadcast_buffers", "ddp_bucket_cap_mb", "ddp_find_unused_parameters", "ddp_static_graph",
    "local_rank", "average_tokens_across_devices", "dataloader_drop_last", "dataloader_in_order",
    "train_sampling_strategy", "ignore_data_skip", "resume_from_checkpoint",
})
# Refused in __init__ (_pact_refusals) whenever set so that they would change the loss, with the alternative:
# sequence-level ratios, and the parameters of the loss types with no PACT counterpart (loss_type itself is read).
REFUSED_FIELDS = frozenset({
    "importance_sampling_level", "sapo_temperature_neg", "sapo_temperature_pos", "vespo_k_pos", "vespo_lambda_pos",
    "vespo_k_neg", "vespo_lambda_neg",
})
# No effect on the loss or the update: logging, output, saving, hub, evaluation schedule, data-loader workers.
# (label_smoothing_factor: GRPOTrainer replaces the Trainer's loss and never reads it; use_cache: generation speed.)
NO_LOSS_EFFECT_FIELDS = frozenset({
    "output_dir", "run_name", "project", "report_to", "logging_steps", "logging_strategy", "logging_first_step",
    "logging_nan_inf_filter", "log_level", "log_level_replica", "log_on_each_node", "log_completions",
    "log_multimodal", "num_completions_to_print", "log_unique_prompts", "log_completions_hub_repo", "disable_tqdm",
    "debug", "skip_memory_metrics", "include_num_input_tokens_seen", "trackio_bucket_id", "trackio_space_id",
    "trackio_static_space_id", "save_strategy", "save_steps", "save_total_limit", "save_only_model",
    "save_on_each_node", "restore_callback_states_from_checkpoint", "enable_jit_checkpoint", "push_to_hub",
    "hub_model_id", "hub_strategy", "hub_token", "hub_private_repo", "hub_always_push", "hub_revision", "do_train",
    "do_eval", "do_predict", "eval_strategy", "eval_steps", "eval_delay", "eval_on_start", "eval_accumulation_steps",
    "eval_do_concat_batches", "eval_use_gather_object", "batch_eval_metrics", "include_for_metrics",
    "prediction_loss_only", "load_best_model_at_end", "metric_for_best_model", "greater_is_better", "label_names",
    "length_column_name", "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
    "dataloader_prefetch_factor", "dataloader_multiprocessing_context", "ddp_timeout", "torch_empty_cache_steps",
    "label_smoothing_factor", "use_cache",
})


def pact_config_from_grpo_args(args, **overrides):
    """A ``PACTLossConfig`` carrying a ``GRPOConfig``'s clipping, KL term and loss aggregation.

    ``epsilon`` / ``epsilon_high`` clip both contexts' ratios; ``delta`` (TRL's two-sided clipping: the unclipped
    ratio capped at ``delta``) is the dual clip ``dual_clip = delta``, which bounds a negative-advantage token's loss
    by ``-A delta``; for ``delta > 1 + epsilon_high`` the two are the same function of the ratio, and TRL's cap
    leaves positive-advantage tokens alone, so a smaller ``delta`` is refused. ``beta`` weighs the k3 KL of the
    prompt-only policy to the reference, ratio-weighted when ``use_bias_correction_kl``; ``loss_type`` picks
    ``loss_agg`` (``LOSS_AGG``), with ``dr_grpo`` dividing each sequence by ``max_completion_length``.
    """
    if args.loss_type not in LOSS_AGG:
        raise ValueError(f"PACTGRPOTrainer: GRPOConfig.loss_type={args.loss_type!r} has no PACT counterpart; "
                         f"choose one of {sorted(LOSS_AGG)}")
    eps_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    if args.delta is not None and args.delta <= 1.0 + eps_high:
        raise ValueError(f"PACTGRPOTrainer: GRPOConfig.delta={args.delta} must exceed 1 + epsilon_high = "
                         f"{1.0 + eps_high}: below it TRL's cap also clips positive-advantage ratios, which PACT's "
                         "dual clip does not")
    values = dict(clip_eps_low=args.epsilon, clip_eps_high=eps_high, dual_clip=args.delta,
                  beta_kl=args.beta, kl_estimator="k3", kl_ratio_weighted=args.use_bias_correction_kl,
                  loss_agg=LOSS_AGG[args.loss_type])
    if args.loss_type == "dr_grpo":
        values["loss_scale_factor"] = args.max_completion_length
    values.update(overrides)
    return PACTLossConfig(**values)


class ScoredMicroBatch(NamedTuple):
    """What the loss of one micro-batch is computed from (``PACTGRPOTrainer.pact_batch``)."""

    batch: PACTBatch  # pact_loss's input; advantages [B, T] when GRPOConfig's token filters weigh the surrogate
    aux_loss: Optional[torch.Tensor]  # MoE load-balancing loss of the forwards; None unless TRL would add one
    bonus_mask: torch.Tensor  # [B, T] the tokens GRPOConfig's entropy bonus averages over
    metrics: dict  # the filters' statistics (off_policy_kept)


def _unpadded(ids, mask):
    """ids, mask: [B, P]. Returns the B lists of ids where mask is 1."""
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


class PACTGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` trained with the PACT objective.

    Args (besides GRPOTrainer's, all keyword):
        pact_config: ``PACTLossConfig``; default: PACT defaults with GRPOConfig's ``epsilon``,
            ``epsilon_high``, ``delta``, ``beta`` (k3 KL) and ``loss_type`` carried over
            (``pact_config_from_grpo_args``); one given by hand must agree with them.
        trace_template: ``TraceContextTemplate`` writing the trace into the privileged prompt.
        scoring: ``"padded"`` (TRL's forward, up to three per micro-batch) or ``"packed"`` (one tree-packed
            forward).
    """

    def __init__(self, *args, pact_config=None, trace_template=None, scoring="padded", **kwargs):
        super().__init__(*args, **kwargs)
        self.trace_template = trace_template or TraceContextTemplate()
        self.scoring = scoring
        self._entropy_bonus_on = self.args.entropy_coef != 0.0 or self.args.use_adaptive_entropy
        refused = self._pact_refusals(pact_config)
        if refused:
            raise ValueError("PACTGRPOTrainer does not support:\n" + "\n".join(f"- {r}" for r in refused))
        self.pact_config = pact_config or pact_config_from_grpo_args(self.args)
        self._check_dataset(self.train_dataset, "train_dataset")
        evals = self.eval_dataset if isinstance(self.eval_dataset, dict) else {None: self.eval_dataset}
        for key, dataset in evals.items():
            self._check_dataset(dataset, "eval_dataset" if key is None else f"eval_dataset[{key!r}]")

    def _pact_refusals(self, pact_config):
        """One line per option that would change the loss in a way PACT does not implement: the field, why, and
        what to use instead. Every GRPOConfig field in ``REFUSED_FIELDS`` is checked here, and a ``pact_config``
        given by hand must agree with the GRPOConfig fields it carries (else one of them would be dropped)."""
        args, refused = self.args, []
        eps_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
        mappable = args.loss_type in LOSS_AGG and (args.delta is None or args.delta > 1.0 + eps_high)
        if pact_config is not None and mappable:
            derived = pact_config_from_grpo_args(args)
            for name, source in GRPO_SOURCES.items():
                ours, theirs = getattr(pact_config, name), getattr(derived, name)
                if ours != theirs:
                    refused.append(f"pact_config.{name}={ours!r} disagrees with GRPOConfig's {source} ({theirs!r}); "
                                   "build pact_config with pact_config_from_grpo_args(args, ...)")
        if self.scoring not in ("padded", "packed"):
            refused.append(f"scoring={self.scoring!r}: use 'padded' or 'packed'")
        if self.scoring == "packed" and self.accelerator.num_processes > 1:
            refused.append("scoring='packed' with more than one process: use 'padded'")
        if self.scoring == "packed" and args.cast_lm_head_to_fp32:
            refused.append("cast_lm_head_to_fp32 with scoring='packed': the packed pass reads lm_head.weight itself, "
                           "without TRL's fp32 cast; use scoring='padded'")
        if args.loss_type not in LOSS_AGG:  # also covers sapo_temperature_* and vespo_*, read only by their loss
            refused.append(f"loss_type={args.loss_type!r}: its surrogate has no PACT counterpart; use one of "
                           f"{sorted(LOSS_AGG)}")
        if self.aux_loss_enabled and self.scoring == "packed":
            refused.append(f"router_aux_loss_coef={self.router_aux_loss_coef} (this MoE model's load-balancing loss) "
                           "with scoring='packed': the packed pass has no router losses; use scoring='padded' or "
                           "router_aux_loss_coef=0.0")
        if args.delta is not None and args.delta <= 1.0 + eps_high:
            refused.append(f"delta={args.delta} <= 1 + epsilon_high: TRL's cap would also clip positive-advantage "
                           "ratios, PACT's dual clip does not; use delta > 1 + epsilon_high")
        if self._entropy_bonus_on and pact_config is not None and pact_config.c_ent > 0:
            refused.append(f"entropy_coef={args.entropy_coef} (or use_adaptive_entropy) with pact_config.c_ent="
                           f"{pact_config.c_ent}: two entropy bonuses; keep one")
        if pact_config is not None:
            refused += [f"{option}: the advantages are GRPOTrainer's; set GRPOConfig.scale_rewards instead"
                        for option in advantage_options(pact_config)]
        if self.importance_sampling_level != "token":
            refused.append("importance_sampling_level='sequence': no PACT counterpart; use 'token'")
        if self._is_vlm:
            refused.append("vision-language models: PACT traces are text only")
        return refused

    def _set_signature_columns_if_needed(self):
        """With ``remove_unused_columns=True`` TRL keeps only its own columns; PACT needs ``trace`` too."""
        super()._set_signature_columns_if_needed()
        if "trace" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "trace"]

    # ------------------------------------------------------------ generation side

    def _pact_example(self, row, where):
        """The ``Example`` of one data set row: its prompt, a list of messages or a string (TRL's standard format,
        which becomes one user message here), and its trace: messages, as a list or a JSON string (one that starts
        with ``[``), or any other string, the expert's answer as text (one assistant turn). ``where`` names the
        row in a ``DataFormatError``."""
        trace = row.get("trace")
        if trace is None:
            raise DataFormatError(f"PACTGRPOTrainer: {where} has no 'trace' column")
        if isinstance(trace, str) and not trace.lstrip().startswith("["):
            trace = [{"role": "assistant", "content": trace}]
        elif isinstance(trace, str):
            try:
                trace = json.loads(trace)
            except json.JSONDecodeError as exc:
                raise DataFormatError(f"PACTGRPOTrainer: {where}: 'trace' is not valid JSON ({exc.msg})") from None
        prompt = row.get("prompt")
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if not isinstance(prompt, list):
            raise DataFormatError(f"PACTGRPOTrainer: {where}: 'prompt' must be a string or a list of messages, "
                                  f"got {type(prompt).__name__}")
        try:
            example = parse_example({"id": where, "messages": prompt, "trace": trace})
        except DataFormatError as exc:
            raise DataFormatError(f"PACTGRPOTrainer: {where}: {exc}") from None
        example.tools = self.tools or []
        return example

    def _trace_conditioned_prompts(self, rows, examples):
        """The prompts ``(x, h)`` in the rows' own format: messages with the trace written after the last user
        message's text (``trace_conditioned_messages``), or, for string prompts, that text itself, which TRL then
        tokenizes without a chat template as it does the prompt-only string."""
        messages = [trace_conditioned_messages(ex, self.trace_template) for ex in examples]
        if isinstance(rows[0]["prompt"], str):
            return [m[-1]["content"] for m in messages]
        return messages

    def _check_dataset(self, dataset, name):
        """Every row of a map-style data set parses, and its trace-conditioned prompt and its trace render under
        the trainer's chat template and tools: a bad row fails at construction with its number, not at the step
        that samples it. (One pass over the data; iterable data sets are checked as their rows arrive.)"""
        if dataset is None or not hasattr(dataset, "__len__"):
            return
        for i, row in enumerate(dataset):
            where = f"{name} row {i}"
            example = self._pact_example(row, where)
            try:
                tc_prompt = self._trace_conditioned_prompts([row], [example])[0]
                if not isinstance(tc_prompt, str):
                    render(self._tokenizer, tc_prompt, example.tools, True, **self._template_kwargs())
                trace_sequences(self._tokenizer, example, **self._template_kwargs())
            except Exception as exc:  # the template's own error (jinja2, ValueError, ...), re-raised with the row
                raise DataFormatError(f"PACTGRPOTrainer: {where}: the trace does not render under the chat template "
                                      f"({type(exc).__name__}: {exc})") from exc

    def _template_kwargs(self):
        kwargs = dict(self.chat_template_kwargs)
        if self.chat_template is not None:
            kwargs["chat_template"] = self.chat_template
        return kwargs

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        device = output["prompt_ids"].device
        B = len(inputs)
        examples = [self._pact_example(row, f"generation batch row {i}") for i, row in enumerate(inputs)]

        tc_ids, _, _ = self._tokenize_prompts(self._trace_conditioned_prompts(inputs, examples))
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

        if output.get("old_per_token_logps") is not None and self._scores_trace_conditioned:
            completion_ids, completion_mask = output["completion_ids"], output["completion_mask"]
            with torch.no_grad():
                output["pact_old_logp_tc"], _, _ = self._get_per_token_logps_and_entropies(
                    self.model, torch.cat([tc_prompt_ids, completion_ids], 1),
                    torch.cat([tc_prompt_mask, completion_mask], 1), completion_ids.size(1),
                    batch_size=self.args.per_device_train_batch_size)

        owner = (global_index % n_gen == 0).tolist()
        output["pact_sft"] = [trace_sequences(self._tokenizer, ex, **self._template_kwargs()) if own and ex.trace
                              else [] for ex, own in zip(examples, owner)]
        # the generation batch's trace sequences over every rank: each rank's SFT term is its share of them (DDP
        # averages the ranks' gradients; a rank's own count made a trace weigh 1 / its rank's count, and the term
        # 1 / num_processes of a one-process run's where a prompt group spans ranks and one of them holds its trace)
        n_sft = torch.tensor(float(sum(len(s) for s in output["pact_sft"])), device=device)
        output["pact_n_sft"] = self.accelerator.reduce(n_sft, reduction="sum")
        return output

    # ------------------------------------------------------------ loss side

    @property
    def _needs_entropy(self):
        """Whether the loss uses the prompt-only policy's entropy: PACT's c_ent term or TRL's entropy bonus."""
        return self.pact_config.c_ent > 0 or self._entropy_bonus_on or self.top_entropy_quantile < 1.0

    def _pact_logps(self, model, prompt_ids, prompt_mask, completion_ids, completion_mask, entropy=False):
        """TRL's forward of the completions after the prompts: (logp [B, T], entropy [B, T] or None, aux_loss or
        None), the MoE load-balancing loss when TRL would add it."""
        return self._get_per_token_logps_and_entropies(
            model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1),
            completion_ids.size(1), compute_entropy=entropy, compute_aux_loss=self.aux_loss_enabled)

    @property
    def _scores_trace_conditioned(self):
        """Whether the loss uses the trace-conditioned rollouts (``mode="pact"``); else they are not scored."""
        return self.pact_config.mode == "pact"

    def _scores_traces(self):
        """Whether the loss uses the traces at this progress (SFT on, ``lambda_sft > 0``); else they are not
        scored. The same on every rank, so DDP's forwards stay in step."""
        config = self.pact_config
        if config.mode == "sft_then_grpo":
            sft = self.pact_progress() < config.switch_progress
        else:
            sft = config.mode != "grpo"
        return sft and config.lambda_sft > 0

    def _packed_logps(self, model, inputs, sequences):
        """One tree-packed forward of the prompt-only rollouts, the trace-conditioned rollouts (when the loss
        uses them) and the traces.

        Returns (logp_po [B, T], entropy [B, T] or None, logp_tc [B, T] or None, sft_logp [S, E - 1] or None,
        None): no router loss, which is refused with this scoring."""
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        B, T = completion_ids.shape
        completions = _unpadded(completion_ids, completion_mask)  # TRL's completion masks are prefixes
        contexts = [_unpadded(inputs["prompt_ids"], inputs["prompt_mask"])]
        if self._scores_trace_conditioned:
            contexts.append(_unpadded(inputs["pact_tc_prompt_ids"], inputs["pact_tc_prompt_mask"]))
        seqs = [ctx[i] + completions[i] for ctx in contexts for i in range(B)] + [s.input_ids for s in sequences]
        with_entropy = self._needs_entropy
        with self.accelerator.autocast():  # the mixed precision TRL's own forward runs under
            out = sequence_logprobs(model, seqs, temperature=self.temperature, return_entropy=with_entropy)
        logp, ent = zip(*out) if with_entropy else (out, None)

        def completion_part(values, k, context):  # values of tokens 1..n-1 -> the completion's tokens
            start = len(context) - 1
            return values[k][start:start + len(completions[k % B])]

        logp_po = pad_rows([completion_part(logp, i, contexts[0][i]) for i in range(B)], T)
        logp_tc = None
        if len(contexts) == 2:
            logp_tc = pad_rows([completion_part(logp, B + i, contexts[1][i]) for i in range(B)], T)
        entropy = pad_rows([completion_part(ent, i, contexts[0][i]) for i in range(B)], T) if with_entropy else None
        width = max((len(s.input_ids) - 1 for s in sequences), default=0)
        sft_logp = pad_rows(list(logp[len(contexts) * B:]), width) if sequences else None
        return logp_po, entropy, logp_tc, sft_logp, None

    def _padded_logps(self, model, inputs, sequences):
        """The same as ``_packed_logps`` through TRL's own forward: one padded batch per context the loss uses
        (prompt-only rollouts; trace-conditioned rollouts in mode pact; traces while the SFT term is on). The last
        value is the MoE load-balancing loss when TRL would add one: the mean of these forwards' losses (the
        traces' counted when the micro-batch holds traces), as TRL averages it over the chunks of its forward."""
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        logp_po, entropy, aux_po = self._pact_logps(model, inputs["prompt_ids"], inputs["prompt_mask"],
                                                    completion_ids, completion_mask, entropy=self._needs_entropy)
        logp_tc = aux_tc = None
        if self._scores_trace_conditioned:
            logp_tc, _, aux_tc = self._pact_logps(model, inputs["pact_tc_prompt_ids"],
                                                  inputs["pact_tc_prompt_mask"], completion_ids, completion_mask)
        sft_logp = aux_sft = None
        if self._scores_traces():
            # Every rank runs the trace forward, on a 2-token stand-in when it holds no trace: DDP synchronises
            # at each forward, and ranks that ran different numbers of forwards would wait on each other forever.
            rows = [s.input_ids for s in sequences] or [[self._tokenizer.pad_token_id] * 2]
            device = completion_ids.device
            ids = pad_rows(rows, value=self._tokenizer.pad_token_id, device=device)
            attn = pad_rows([[1] * len(r) for r in rows], device=device)
            with_aux = self.aux_loss_enabled and bool(sequences)
            sft_logp, _, aux_sft = self._get_per_token_logps_and_entropies(model, ids, attn, ids.size(1) - 1,
                                                                           compute_aux_loss=with_aux)
        aux = [a for a in (aux_po, aux_tc, aux_sft) if a is not None]
        aux_loss = torch.stack(aux).mean() if aux else None
        return logp_po, entropy, logp_tc, sft_logp if sequences else None, aux_loss

    def _surrogate_filters(self, inputs, response_mask, logp_po, old_logp_po, entropy, metrics):
        """GRPOConfig's per-token filters of the policy-gradient term, folded into the advantages.

        A weight ``w >= 0`` on a token's clipped surrogate is the surrogate with advantage ``A w`` there (it is
        positively homogeneous in ``A``, dual clip included), so one ``[B, T]`` advantage weighs both contexts'
        surrogates, and leaves alone the KL and entropy terms, which TRL does not weigh, and the token counts
        the terms are averaged over. Each filter is a function of the prompt-only rollout, the samples both
        contexts score:

        - ``off_policy_mask_threshold``: a negative-advantage rollout whose prompt-only policy has moved from the
          sampler's log-probs (vLLM's if any, else the old policy's) by more than the threshold in mean token KL
          gets weight 0 (TRL's ``get_off_policy_mask``);
        - ``top_entropy_quantile < 1``: only tokens whose prompt-only entropy is in that top quantile of the
          step's tokens, over all ranks, keep weight 1 (TRL's ``get_high_entropy_mask``); the entropy bonus is
          averaged over them too;
        - ``vllm_importance_sampling_correction`` (with vLLM): TRL's truncated or masked ratio
          ``pi_old(y | x) / pi_vLLM(y | x)``, per token or per sequence. Both surrogates are expectations over
          the same prompt-only samples, so the one correction of their sampler serves both.

        Returns (advantages [B] or [B, T], bonus_mask [B, T]: the tokens the entropy bonus averages over)."""
        advantages, bonus_mask = inputs["advantages"], response_mask
        weight = None  # [B, T] or [B, 1]; None: no filter on
        if self.off_policy_mask_threshold is not None:
            sampler = inputs.get("sampling_per_token_logps", old_logp_po)
            keep = self.get_off_policy_mask(advantages[:, None], logp_po, sampler, response_mask,
                                            self.off_policy_mask_threshold).float()  # [B, 1]
            weight = keep
            metrics["off_policy_kept"] = keep.mean().item()
        if self.top_entropy_quantile < 1.0:
            keep = self.get_high_entropy_mask(entropy, response_mask, 1.0 - self.top_entropy_quantile)  # [B, T]
            weight = keep.float() if weight is None else weight * keep
            bonus_mask = response_mask * keep
        if self.use_vllm and self.vllm_importance_sampling_correction:
            ratio = inputs["importance_sampling_ratio"]  # [B, T] or [B, 1]
            weight = ratio if weight is None else weight * ratio
        if weight is None:
            return advantages, bonus_mask
        return advantages[:, None] * weight.expand_as(logp_po), bonus_mask

    def pact_batch(self, model, inputs):
        """The ``ScoredMicroBatch`` of one micro-batch of ``inputs`` (current-policy log-probs carry gradients)."""
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        response_mask = completion_mask if inputs.get("tool_mask") is None else completion_mask * inputs["tool_mask"]
        sequences = [s for owned in inputs["pact_sft"] for s in owned] if self._scores_traces() else []
        score = self._packed_logps if self.scoring == "packed" else self._padded_logps
        logp_po, entropy, logp_tc, sft_logp, aux_loss = score(model, inputs, sequences)
        old_po = inputs.get("old_per_token_logps")
        old_po = logp_po.detach() if old_po is None else old_po
        old_tc = inputs.get("pact_old_logp_tc")
        metrics = {}
        advantages, bonus_mask = self._surrogate_filters(inputs, response_mask, logp_po, old_po, entropy, metrics)
        batch = PACTBatch(
            # TRL keeps the rewards to itself: with advantages given, rewards only feed a metric we drop
            response_mask=response_mask, rewards=torch.zeros_like(inputs["advantages"]),
            group_ids=inputs["pact_group"], logp_tc=logp_tc, logp_po=logp_po,
            old_logp_tc=logp_tc.detach() if old_tc is None and logp_tc is not None else old_tc, old_logp_po=old_po,
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
        return ScoredMicroBatch(batch, aux_loss, bonus_mask, metrics)

    def _entropy_bonus(self, entropy, mask, training, metrics):
        """GRPOConfig's entropy bonus, ``entropy_coef * H``, before the division by the accumulation steps.

        ``H`` is the mean entropy of the prompt-only policy (the rollouts' own context, the one PACT's KL and
        ``c_ent`` terms use) over the micro-batch's response tokens, whatever ``loss_type`` is: TRL's meaning,
        which ``c_ent`` (aggregated like the RL term) does not have for grpo, dr_grpo or dapo. With
        ``use_adaptive_entropy`` the coefficient applies only while the previous optimizer step's entropy, over
        all its micro-batches and ranks, was at most ``entropy_target``; after each step it moves by
        ``entropy_coef_delta``, up when that entropy was at most the target and down otherwise, within
        ``[entropy_coef_min, entropy_coef_max]``. The controller keeps its state in GRPOTrainer's own attributes
        (``entropy_coef``, ``_last_world_entropy``), so TRL's checkpoints save and restore it."""
        m = mask.bool()
        token_entropy = torch.where(m, entropy, torch.zeros_like(entropy))  # [B, T]
        h = token_entropy.sum() / m.sum().clamp(min=1)
        coef = self.entropy_coef
        if self.use_adaptive_entropy:
            if self._last_world_entropy > self.args.entropy_target:
                coef = 0.0
            if training:
                self._adapt_entropy_coef(token_entropy.detach().sum(), m.sum())
        metrics["entropy"], metrics["entropy_coef"] = h.item(), coef
        return coef * h

    def _adapt_entropy_coef(self, entropy_sum, tokens):
        """Adds one micro-batch to the accumulation window; at the window's last one, updates the coefficient."""
        stats = torch.stack([entropy_sum.float(), tokens.float()])
        window = stats if self._entropy_window_stats is None else self._entropy_window_stats + stats
        self._entropy_window_stats = window
        if not self.accelerator.sync_gradients:
            return
        total, count = self.accelerator.reduce(window, reduction="sum").tolist()
        self._last_world_entropy = total / max(count, 1.0)
        if self._last_world_entropy <= self.args.entropy_target:
            self.entropy_coef = min(self.entropy_coef + self.args.entropy_coef_delta, self.args.entropy_coef_max)
        else:
            self.entropy_coef = max(self.entropy_coef - self.args.entropy_coef_delta, self.args.entropy_coef_min)
        self._entropy_window_stats = None

    def pact_progress(self):
        """Training progress s in [0, 1] for the annealing schedules: optimizer steps done / max_steps."""
        return min(self.state.global_step / self.state.max_steps, 1.0) if self.state.max_steps else 0.0

    def _compute_loss(self, model, inputs):
        """``pact_loss`` of the micro-batch, scaled as TRL scales its loss_type, minus GRPOConfig's entropy bonus
        (``_entropy_bonus``), plus ``router_aux_loss_coef`` times the MoE load-balancing loss of the adapter's
        forwards, both divided by the accumulation steps as TRL divides them."""
        batch, aux_loss, bonus_mask, filter_metrics = self.pact_batch(model, inputs)
        training = self.model.training
        accumulation = self.current_gradient_accumulation_steps if training else 1
        # pact_loss averages the SFT term over the micro-batch's trace sequences; this makes every sequence
        # of the generation batch weigh the same in the optimizer step, on every rank (pact_n_sft and
        # num_items_in_batch count the generation batch over all ranks; DDP averages the ranks' gradients)
        per_micro = inputs["pact_n_sft"].item() / (self.args.steps_per_generation if training else 1)
        here = sum(len(owned) for owned in inputs["pact_sft"])
        tokens = None  # TRL's other loss types average each micro-batch; gradient accumulation adds them
        if self.args.loss_type == "dapo":  # a token sum over the generation batch's tokens
            tokens = inputs["num_items_in_batch"].clamp(min=1.0).item()
            tokens = tokens * accumulation / self.args.steps_per_generation if training else tokens
        rl_scale, sft_scale = loss_scales(batch.response_mask, here, "token-mean", step_tokens=tokens,
                                          step_traces=per_micro * accumulation, world=self.accelerator.num_processes)
        if tokens is None:
            rl_scale = 1.0 / accumulation
            if self.args.loss_type in ("grpo", "dr_grpo"):
                # TRL averages over every row of the micro-batch, a row whose completion mask is all zero
                # (mask_truncated_completions) included; pact_loss's seq-means count non-empty rows only
                rl_scale *= response_counts(batch.response_mask)[1] / max(batch.response_mask.shape[0], 1)
        loss, metrics = pact_loss(batch, self.pact_config, self.pact_progress(), rl_scale=rl_scale,
                                  sft_scale=sft_scale)
        metrics.update(filter_metrics)
        if self._entropy_bonus_on:
            bonus = self._entropy_bonus(batch.entropy, bonus_mask, training, metrics)
            loss = loss - bonus / accumulation
        if not loss.requires_grad and torch.is_grad_enabled():
            # nothing here reaches the loss (mode sft, and the micro-batch holds no trace): a zero term on the
            # prompt-only forward keeps a graph to backpropagate, as the optimizer step and DDP expect
            loss = loss + 0.0 * torch.where(batch.response_mask.bool(), batch.logp_po, 0.0).sum()
        if aux_loss is not None:
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            metrics["aux_loss"] = aux_loss.item()
        metrics["loss/total"] = loss.item()
        mode = "train" if training else "eval"
        for key, value in metrics.items():
            if key != "reward_mean":  # rewards are TRL's to log; the batch carries advantages only
                self._metrics[mode][f"pact/{key}"].append(value)
        return loss
