"""Prompt-only multi-turn rollouts: a group of G episodes per prompt, batched, with a KV cache.

Each turn, every live episode of the group samples an assistant turn (temperature, top-p, a
per-turn token cap) until the end-of-turn token; tool calls are parsed from the text in the
template's format and executed by the environment; the tool responses (and, in multi-turn
environments, a later user turn) are rendered by the chat template and appended as context
tokens. An episode ends on a turn without tool calls (its answer), or at the turn limit.

The result per episode: the response token ids after the prompt, ``response_mask`` (1 on
sampled tokens), the behaviour log-probs of sampled tokens (``log softmax(logits / T)`` of the
sampling model, before top-p truncation), and the reward. ``RolloutEngine`` is the interface a
faster engine implements to replace ``HFRolloutEngine``: ``pact_fast.rollout_vllm.VLLMRolloutEngine``
(``rollout.engine=vllm``) is one.
"""
import inspect
import math
from dataclasses import dataclass, field, fields
from typing import Optional, Protocol

import torch

from .chat import prompt_ids, render
from .envs.base import MAX_CALLS_PER_TURN, MAX_RESULT_CHARS, ToolEnvError, contract_call
from .envs.sandbox import CALL_TIMEOUT_S
from .toolcalls import MAX_CALL_CHARS, PARSERS, parse_tool_calls


@dataclass
class RolloutConfig:
    group_size: int = field(default=2, metadata={"help": "rollouts per prompt (G)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass; 1.0 = off"})
    max_new_tokens: int = field(default=48, metadata={"help": "tokens per assistant turn"})
    max_turns: int = field(default=3, metadata={"help": "assistant turns per episode (the environment's limit)"})
    tool_call_format: str = field(default="compact", metadata={"help": "how the model writes tool calls",
                                                               "choices": tuple(PARSERS)})
    call_timeout: float = field(default=CALL_TIMEOUT_S, metadata={
        "help": "seconds one tool call may run (BFCL back-ends run in a worker killed past it)"})
    max_call_chars: int = field(default=MAX_CALL_CHARS, metadata={
        "help": "longer tool-call text or arguments become an error observation"})
    max_result_chars: int = field(default=MAX_RESULT_CHARS, metadata={
        "help": "longer tool responses become an error observation"})
    max_calls_per_turn: int = field(default=MAX_CALLS_PER_TURN, metadata={
        "help": "tool calls one assistant turn may make; the ones past it become error observations, not run"})
    greedy: bool = field(default=False, metadata={"help": "argmax decoding (evaluation)"})
    engine: str = field(default="hf", metadata={
        "help": "hf: Hugging Face forward with a KV cache (HFRolloutEngine); vllm: a colocated vLLM engine "
                "(pact_fast.rollout_vllm; pip install -e '.[vllm]'), weights pushed in place every step",
        "choices": ("hf", "vllm")})
    is_cap: Optional[float] = field(default=None, metadata={
        "help": "truncated importance sampling: each sampled token's policy-gradient weight is "
                "min(pi_trainer / pi_engine, is_cap) (losses.truncated_importance_weights); None = 2.0 with "
                "engine=vllm, off with hf (its log-probs are the trainer's); 0 = off; else >= 1"})
    vllm_dtype: str = field(default="auto", metadata={
        "help": "vllm: the engine's weights and compute; auto = float32 on CPU, bfloat16 on CUDA",
        "choices": ("auto", "float32", "bfloat16", "float16")})
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata={
        "help": "vllm: share of the GPU the engine may take (weights + KV), the rest left to training; on CPU "
                "(vLLM's meaning) the share of RAM, used only when vllm_kv_cache_gb = 0"})
    vllm_kv_cache_gb: float = field(default=1.0, metadata={
        "help": "vllm: KV-cache memory in GiB (vLLM's kv_cache_memory_bytes; on CPU it replaces "
                "VLLM_CPU_KVCACHE_SPACE, hidden from the engine); 0 = sized from vllm_gpu_memory_utilization"})
    vllm_max_model_len: int = field(default=4096, metadata={
        "help": "vllm: longest prompt + episode in tokens (at most the model's max_position_embeddings)"})
    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": "vllm: GPUs the engine shards over"})
    vllm_enforce_eager: bool = field(default=True, metadata={
        "help": "vllm: eager execution (no torch.compile or CUDA graphs): quicker to start, slower per token"})
    vllm_sleep: Optional[bool] = field(default=None, metadata={
        "help": "vllm: sleep mode: the engine frees its KV cache and weights (vLLM sleep level 2) while the trainer "
                "updates, and wakes before the next rollouts; None = on where the engine runs on CUDA, off on "
                "CPU (vLLM has no sleep mode there, so true is refused)"})

    def __post_init__(self):
        if self.engine == "hf":
            changed = [f.name for f in fields(self) if f.name.startswith("vllm_")
                       and getattr(self, f.name) != f.default]
            if changed:
                raise ValueError(f"rollout.{changed[0]} applies to rollout.engine=vllm only (engine is hf)")
        if self.is_cap is not None and self.is_cap != 0 and not self.is_cap >= 1:
            raise ValueError(f"rollout.is_cap={self.is_cap} must be >= 1 (a cap on pi_trainer / pi_engine), "
                             "0 (off) or None (auto)")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ValueError(f"rollout.vllm_gpu_memory_utilization={self.vllm_gpu_memory_utilization} must lie "
                             "in (0, 1]")
        if not self.vllm_kv_cache_gb >= 0:
            raise ValueError(f"rollout.vllm_kv_cache_gb={self.vllm_kv_cache_gb} must be >= 0 (0 = sized by vLLM)")
        for name in ("vllm_max_model_len", "vllm_tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"rollout.{name}={getattr(self, name)} must be >= 1")
        if self.vllm_sleep and not torch.cuda.is_available():
            raise ValueError("rollout.vllm_sleep=true needs the engine on a CUDA GPU: vLLM has no sleep mode on "
                             "CPU (leave it unset: off on CPU, on with CUDA)")


@dataclass
class Episode:
    prompt_ids: list
    response_ids: list = field(default_factory=list)
    response_mask: list = field(default_factory=list)  # 1 = sampled by the model, 0 = tool/user context
    behavior_logp: list = field(default_factory=list)  # log-prob of each sampled token (0 on context)
    reward: float = 0.0
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    finish: str = ""  # answer | turn_limit | length
    final_text: str = ""
    # per sampled turn, (tool calls, tool errors) it made: what ``task_inputs.fit_episodes`` recounts from when it
    # cuts the episode (an engine that leaves it empty keeps its counts on a cut)
    turn_tools: list = field(default_factory=list)

    @property
    def num_model_tokens(self):
        return sum(self.response_mask)


class RolloutEngine(Protocol):
    """What the trainer needs from a generator (``HFRolloutEngine`` is the reference implementation).

    - ``generator``: the ``torch.Generator`` sampling draws from; the trainer reseeds it every step
      (``engine.generator.manual_seed(...)``) so that runs are reproducible.
    - ``rollout(examples, make_env, group_size=None, greedy=None)``: ``group_size`` (default: the
      engine's configured G) prompt-only episodes of every example, a list per example of
      ``Episode``. ``greedy=True`` asks for argmax decoding (held-out evaluation), ``None`` keeps the
      engine's configured decoding. Evaluation goes through this method too, so a custom engine is
      never bypassed. ``Episode.turn_tools`` is optional: with it, an episode cut to fit its step
      (``task_inputs.fit_episodes``) reports the turns and tool calls it kept.
    """

    generator: torch.Generator

    def rollout(self, examples, make_env, group_size=None, greedy=None) -> list:  # per example: list[Episode]
        ...


def _encodable(text):
    """``text`` with what UTF-8 cannot encode (a lone surrogate the model wrote as ``\\ud800`` in a call's JSON and a
    tool, or a simulated user, echoed back) replaced, so the tokenizer takes it: model text never stops a run."""
    return text.encode("utf-8", "replace").decode("utf-8")


def _cache_argument(model):
    """The KV-cache keyword of the model's forward and output: ``cache`` in recent transformers, which warn on
    every call with ``past_key_values``; ``past_key_values`` in older ones (>= 4.53 supported)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _last_logits_only(model):
    """``{"logits_to_keep": 1}`` where the model's forward takes it: a prefill then computes the logits of the
    last position only ([N, 1, V] instead of [N, L, V] fp32, which at 8 rows x 4k tokens x 152k vocabulary is
    ~20 GB); ``{}`` for a model without the option (every position's logits, the last one used)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _turn_generator(generator, device):
    """The generator a turn samples from: ``generator`` itself on CPU; elsewhere a generator on ``device`` seeded
    by one draw from it, so sampling stays on the device (no [N, V] copy to the host per token) and a run stays
    reproducible from the engine's seed."""
    if device.type == "cpu":
        return generator
    seed = int(torch.randint(0, 2 ** 62, (), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


def _sample(logits, temperature, top_p, greedy, generator):
    """logits [N, V] -> (tokens [N], behaviour logp [N] under softmax(logits / T))."""
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    if greedy:
        tokens = logprobs.argmax(-1)
    else:
        probs = logprobs.exp()
        if top_p < 1.0:
            sorted_p, order = probs.sort(-1, descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p > top_p
            probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


def _checked_reward(env, example, reward):
    """``reward`` as a float (a Python, numpy or one-element torch number), or a ``ToolEnvError`` naming ``env``'s
    class when it is not a finite number (a None or NaN would turn every advantage of its group into NaN), finite
    in float32 too (the trainer's rewards are float32: 1e300 became inf there, and a crash)."""
    try:
        value = math.nan if isinstance(reward, (str, bytes)) or reward is None else float(reward)
    except (TypeError, ValueError, OverflowError, RuntimeError):  # RuntimeError: a tensor of several numbers
        value = math.nan
    if not abs(value) <= torch.finfo(torch.float32).max:
        raise ToolEnvError(f"{type(env).__name__}.reward returned {str(reward)[:100]!r} for example {example.id}: "
                           "a reward must be a finite number (within float32's range)")
    return value


def _count_errors(env, errors_before, calls, responses):
    """Tool errors of one turn: the environment's own tally (``ToolEnv.errors``, which knows that BFCL's
    errors read "Error during execution: ..."); for an environment without one, malformed calls and
    responses that start with "error" in any case."""
    if isinstance(errors_before, int) and isinstance(getattr(env, "errors", None), int):
        return env.errors - errors_before
    return sum(not hasattr(c, "arguments") or r.lower().startswith("error") for c, r in zip(calls, responses))


class HFRolloutEngine:
    """Sampling with a Hugging Face causal LM and its KV cache, batched across a group's episodes."""

    def __init__(self, model, tokenizer, config=None, seed=0):
        self.model, self.tokenizer = model, tokenizer
        self.config = config or RolloutConfig()
        self.generator = torch.Generator().manual_seed(seed)
        self.eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
        # the longest prompt + episode: past the model's positions a rotary model samples on quietly
        self.max_len = getattr(getattr(model, "config", None), "max_position_embeddings", None) or math.inf

    @torch.no_grad()
    def _generate_turn(self, contexts, greedy, budgets):
        """Sample one assistant turn for each context (lists of ids), at most ``budgets[i]`` (>= 1) tokens for
        context i. Returns per row (tokens, logps, ended on the end-of-turn token)."""
        cfg, model = self.config, self.model
        device = next(model.parameters()).device
        pad = self.tokenizer.pad_token_id or 0
        width = max(map(len, contexts))
        ids = torch.full((len(contexts), width), pad, dtype=torch.long)
        attn = torch.zeros((len(contexts), width), dtype=torch.long)
        for i, c in enumerate(contexts):  # left padding
            ids[i, width - len(c):] = torch.tensor(c)
            attn[i, width - len(c):] = 1
        ids, attn = ids.to(device), attn.to(device)
        position_ids = (attn.cumsum(-1) - 1).clamp_min(0)
        cache_arg = _cache_argument(model)
        out = model(input_ids=ids, attention_mask=attn, position_ids=position_ids, use_cache=True,
                    **_last_logits_only(model))
        past, logits = out[cache_arg], out.logits[:, -1]
        generator = _turn_generator(self.generator, device)
        tokens, logps = [[] for _ in contexts], [[] for _ in contexts]
        ended = torch.zeros(len(contexts), dtype=torch.bool)
        stopped = ended.clone()  # ended, or out of budget
        budgets = torch.tensor(budgets)
        next_pos = position_ids[:, -1]
        for n in range(1, cfg.max_new_tokens + 1):
            tok_dev, lp = _sample(logits, cfg.temperature, cfg.top_p, greedy, generator)
            tok, lp = tok_dev.cpu(), lp.cpu()
            for i in range(len(contexts)):
                if not stopped[i]:
                    tokens[i].append(int(tok[i]))
                    logps[i].append(float(lp[i]))
            ended |= (tok == self.eos) & ~stopped
            stopped |= ended | (budgets <= n)
            if stopped.all():
                break
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
            next_pos = next_pos + 1
            out = model(input_ids=tok_dev[:, None], attention_mask=attn, position_ids=next_pos[:, None],
                        use_cache=True, **{cache_arg: past})
            past, logits = out[cache_arg], out.logits[:, -1]
        return tokens, logps, ended.tolist()

    def _context_block(self, example, conv, new_messages):
        """Token ids the template adds for ``new_messages`` after ``conv``, up to the next generation prompt, from
        the end-of-turn token that ends the sampled turn ``conv[-1]``: what the template writes after it (ChatML's
        newline) the model never samples, so it is context too."""
        before = render(self.tokenizer, conv, example.tools, False)
        after = render(self.tokenizer, conv + new_messages, example.tools, True)
        if not after.startswith(before):
            raise ValueError("the chat template is not prefix-preserving across a tool turn; rollouts need one that is")
        eos = self.tokenizer.eos_token
        turn = len(render(self.tokenizer, conv[:-1], example.tools, True))  # where the sampled turn's text begins
        end = before.rfind(eos, turn)  # (an earlier turn's: its text would come again)
        if end < 0:
            return self.tokenizer(after[len(before):], add_special_tokens=False)["input_ids"]
        block = after[end + len(eos):]
        # encoded behind the end token, as in the whole text: alone, a SentencePiece tokenizer (Llama 2's, Mistral's)
        # would start it with a "▁" of its own
        ids = self.tokenizer(eos + block, add_special_tokens=False)["input_ids"]
        return ids[1:] if ids[:1] == [self.eos] else self.tokenizer(block, add_special_tokens=False)["input_ids"]

    def rollout(self, examples, make_env, group_size=None, greedy=None):
        """``group_size`` (default ``config.group_size``) prompt-only episodes of every example, all
        sampled in one batch; ``make_env(example)`` builds an environment; ``greedy`` (default
        ``config.greedy``) picks argmax decoding. Returns a list per example."""
        return self._episodes(examples, self._prompt_ids(examples), make_env, group_size, greedy)

    def _prompt_ids(self, examples):
        """The rendered prompt of every example: ``{example.id: token ids}``."""
        return {ex.id: prompt_ids(self.tokenizer, ex) for ex in examples}

    def _episodes(self, examples, prompts, make_env, group_size, greedy):
        """``rollout`` on the prompts already rendered (``_prompt_ids``)."""
        cfg = self.config
        G = group_size or cfg.group_size
        greedy = cfg.greedy if greedy is None else greedy
        jobs = [ex for ex in examples for _ in range(G)]
        episodes = [Episode(list(prompts[ex.id])) for ex in jobs]
        envs = [make_env(ex) for ex in jobs]
        convs = [list(ex.messages) for ex in jobs]
        was_training = self.model.training
        self.model.eval()
        try:
            live = list(range(len(jobs)))
            while live:
                full = [i for i in live if len(episodes[i].prompt_ids) + len(episodes[i].response_ids) >= self.max_len]
                for i in full:  # no position left for a token: the episode ran out of length
                    episodes[i].finish = "length"
                live = [i for i in live if i not in full]
                if not live:
                    break
                contexts = [episodes[i].prompt_ids + episodes[i].response_ids for i in live]
                budgets = [int(min(cfg.max_new_tokens, self.max_len - len(c))) for c in contexts]
                tokens, logps, ended = self._generate_turn(contexts, greedy, budgets)
                live = [i for i, toks, lps, done in zip(live, tokens, logps, ended)
                        if self._advance(jobs[i], episodes[i], envs[i], convs[i], toks, lps, done)]
        finally:
            self.model.train(was_training)
        for ep, env, ex in zip(episodes, envs, jobs):
            ep.reward = _checked_reward(env, ex, contract_call(env, "reward", ex.id, ep.final_text)) \
                if ep.finish == "answer" else 0.0
            if hasattr(env, "close"):
                contract_call(env, "close", ex.id)
        return [episodes[k * G:(k + 1) * G] for k in range(len(examples))]

    def _advance(self, example, ep, env, conv, toks, lps, done):
        """Record a sampled turn, run its tool calls, append the context; True while the episode goes on."""
        cfg = self.config
        ep.response_ids += toks
        ep.response_mask += [1] * len(toks)
        ep.behavior_logp += lps
        ep.turns += 1
        text = self.tokenizer.decode(toks, skip_special_tokens=False)
        final = text.replace(self.tokenizer.eos_token, "")  # the turn without its end token, whichever it is
        if not done:
            ep.finish, ep.final_text = "length", final
            ep.turn_tools.append((0, 0))
            return False
        calls = parse_tool_calls(text, cfg.tool_call_format, cfg.max_call_chars)
        assistant = {"role": "assistant", "content": final.strip()}
        if calls:
            errors_before = getattr(env, "errors", None)
            responses = contract_call(env, "step", example.id, calls)
            if not (isinstance(responses, (list, tuple)) and len(responses) == len(calls)
                    and all(isinstance(r, str) for r in responses)):
                raise ToolEnvError(f"{type(env).__name__}.step returned {str(responses)[:100]!r} for {len(calls)} "
                                   f"calls of example {example.id}: expected a response text per call")
            errors = _count_errors(env, errors_before, calls, responses)
            ep.tool_calls += len(calls)
            ep.tool_errors += errors
            ep.turn_tools.append((len(calls), errors))
            new = [{"role": "tool", "tool_call_id": f"call{k}", "content": _encodable(r)}
                   for k, r in enumerate(responses)]
        else:
            ep.turn_tools.append((0, 0))
            user = contract_call(env, "next_user_turn", example.id)
            if user is not None and not (isinstance(user, str) and user.strip()):  # "" went on as an empty turn
                raise ToolEnvError(f"{type(env).__name__}.next_user_turn returned {str(user)[:100]!r} for example "
                                   f"{example.id}: expected the user's text (not blank), or None to end the episode")
            if user is None:
                ep.finish, ep.final_text = "answer", final
                return False
            new = [{"role": "user", "content": _encodable(user)}]
        if ep.turns >= min(cfg.max_turns, getattr(env, "max_turns", cfg.max_turns)):
            ep.finish, ep.final_text = "turn_limit", final
            return False
        block = self._context_block(example, conv + [assistant], new)
        conv += [assistant] + new
        ep.response_ids += block
        ep.response_mask += [0] * len(block)
        ep.behavior_logp += [0.0] * len(block)
        return True
