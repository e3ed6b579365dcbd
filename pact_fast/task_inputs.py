"""Token ids of a task, and the check that every task fits a step before the first one.

Besides its episodes, a prompt group needs its trace-conditioned and prompt-only prompts and the trace's labelled
sequences (the SFT term): ``GroupInputs``, made when a step first draws the task. ``prepare`` makes them once for
every training task before step 1 (keeping only the verdict, not the ids) and refuses, in one line naming the row
(``file:line (id 'x')``), a task that cannot go through a step even with a one-token response, where the step
that first drew it would otherwise stop, possibly hours in, or train on quietly:

- a trace whose tool calls or reasoning render to no token (``chat.check_trace_components``), or whose tool
  calls, rendered and read back as a rollout reads a sampled turn, are not the calls written
  (``check_trace_calls``: the compact format cannot write a list, a boolean or a comma inside a value);
- a trace-conditioned prompt or trace sequence longer than the model's positions (``max_position_embeddings``:
  past them a rotary model reads positions it never trained on and no error says so), or a prompt-only prompt
  longer than what the rollout engine samples from (those positions, within ``rollout.vllm_max_model_len`` with
  the vLLM engine);
- a rollout unit (both prompts and one response token under each, packed) or a trace sequence that packs to
  more tokens than ``train.micro_batch_tokens``.
- a tool the run's ``rollout.tool_call_format`` cannot call (``check_tool_names``: the compact format writes names
  as bare words; a held-out task is checked for it too);
- a trace turn of more tool calls than a rollout runs in one turn, or a tool response longer than a rollout hands
  over (``check_rollout_caps``).

Held-out tasks are checked for their prompt-only prompt, the only one evaluation samples from. With
``data.on_error=skip`` such rows are left out and counted, as ``data.load_examples`` leaves out malformed ones.

An episode can still outgrow its step (turns of tool output after a long trace-conditioned prompt):
``fit_episodes`` cuts it to ``response_cap`` as an episode that ran out of length, so the step goes on.
"""
import json
import time
from dataclasses import dataclass
from typing import Optional

from .chat import (check_trace_components, prompt_ids, trace_call_mismatch, trace_conditioned_prompt_ids,
                   trace_sequences, turn_tokens)
from .data import DataFormatError, keep_rows
from .envs import min_turns
from .envs.base import MAX_CALLS_PER_TURN, MAX_RESULT_CHARS
from .packing import packed_size
from .toolcalls import MAX_CALL_CHARS, ToolCall, parse_one

PROGRESS_EVERY_S = 10.0  # a progress line at most this often while checking a large data set


@dataclass
class GroupInputs:
    """Token ids a group needs besides its episodes."""

    tc_prompt: list
    po_prompt: list
    sft: list  # LabeledSequence items


@dataclass(frozen=True)
class Limits:
    """What a task's sequences must fit: ``micro_batch_tokens`` per packed micro-batch, ``positions`` per scored
    sequence (None: no bound), ``sampling`` per prompt the engine samples from, named ``sampling_name``."""

    micro_batch_tokens: int
    positions: Optional[int] = None
    sampling: Optional[int] = None
    sampling_name: str = "the model's max_position_embeddings"
    max_turns: Optional[int] = None  # rollout.max_turns: assistant turns an episode may take
    max_new_tokens: Optional[int] = None  # rollout.max_new_tokens: tokens an episode's turn may take
    positions_name: str = "max_position_embeddings"  # what sets ``positions``
    max_call_chars: int = MAX_CALL_CHARS  # rollout.max_call_chars: the longest call text a rollout reads
    max_calls_per_turn: int = MAX_CALLS_PER_TURN  # rollout.max_calls_per_turn: calls a rollout runs in one turn
    max_result_chars: int = MAX_RESULT_CHARS  # rollout.max_result_chars: the longest tool response a rollout hands over


def limits(model, config):
    """``Limits`` of a run: ``train.micro_batch_tokens``, the model's ``max_position_embeddings`` (None when its
    config has none), or the shorter length past which its rotary frequencies change (a longrope model's
    ``original_max_position_embeddings``: packed scoring refuses longer sequences, so episodes are cut to it as
    to the positions) and, with ``rollout.engine=vllm``, ``rollout.vllm_max_model_len`` for the sampled prompts
    where it is the tighter bound."""
    from .scoring import length_dependent_rope

    positions = getattr(model.config, "max_position_embeddings", None)
    sampling, name, positions_name = positions, "the model's max_position_embeddings", "max_position_embeddings"
    rope = length_dependent_rope(model.config)
    if rope is not None and (positions is None or rope[1] < positions):
        positions = sampling = rope[1]
        positions_name = f"where its {rope[0]} rotary frequencies change"
        name = f"the model's positions before its {rope[0]} rotary frequencies change"
    vllm_len = config.rollout.vllm_max_model_len
    if config.rollout.engine == "vllm" and (sampling is None or vllm_len < sampling):
        sampling, name = vllm_len, "rollout.vllm_max_model_len"
    return Limits(config.train.micro_batch_tokens, positions, sampling, name, config.rollout.max_turns,
                  config.rollout.max_new_tokens, positions_name, config.rollout.max_call_chars,
                  config.rollout.max_calls_per_turn, config.rollout.max_result_chars)


def group_inputs(tokenizer, example):
    """``GroupInputs`` of ``example``; a trace whose tool calls or reasoning render to nothing is a
    ``DataFormatError`` naming the row (it would teach nothing)."""
    sft = trace_sequences(tokenizer, example)
    inputs = GroupInputs(trace_conditioned_prompt_ids(tokenizer, example), prompt_ids(tokenizer, example), sft)
    try:
        check_trace_components(example, sft)
    except ValueError as exc:
        raise DataFormatError(f"{example.where()}: {str(exc).removeprefix(f'example {example.id!r}: ')}") from None
    return inputs


def check_known_tokens(tokenizer, example, sequences, what):
    """Raise a one-line ``DataFormatError`` when token ``sequences`` (``example``'s ``what``) hold the tokenizer's
    unknown token: text the model can neither read nor write (the built-in model's word tokenizer knows only its
    tasks' words). Says the most any one sequence holds (they overlap: each trace sequence repeats the prompt)."""
    unk = tokenizer.unk_token_id
    if unk is None or unk in (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id):
        return
    n = max(sum(1 for t in ids if t == unk) for ids in sequences)
    if n:
        raise DataFormatError(f"{example.where()}: its {what} has {n} piece(s) of text the tokenizer reads as "
                              f"{tokenizer.unk_token!r}; the built-in model's word tokenizer knows only the built-in "
                              "tasks' words: train a pretrained model (--model DIR) on such data")


def check_special_text(tokenizer, example):
    """Raise a one-line ``DataFormatError`` when a message's text holds one of the tokenizer's special tokens
    (``<|im_end|>`` in a tool result): it is tokenised as the control token, a turn boundary the model would read
    inside the conversation."""
    special = [t for t in tokenizer.all_special_tokens if t]
    texts = [("tools", json.dumps(example.tools, ensure_ascii=False))]
    for field, messages in (("messages", example.messages), ("trace", example.trace)):
        for i, m in enumerate(messages):
            texts += [(f"{field}[{i}].{key}", m.get(key) or "") for key in ("content", "reasoning_content")]
            texts += [(f"{field}[{i}].tool_calls", json.dumps(m.get("tool_calls") or [], ensure_ascii=False)),
                      (f"{field}[{i}].tools", json.dumps(m.get("tools") or [], ensure_ascii=False))]
    for where, text in texts:
        token = next((t for t in special if t in text), None)
        if token:
            raise DataFormatError(f"{example.where()}: {where} holds {token!r}, a special token of the tokenizer: it "
                                  "would read as a control token there (data.on_error=skip leaves such rows out)")


def longest_turn(sequences):
    """Tokens of the longest assistant turn (its reasoning, calls and answer) in ``sequences`` (``trace_sequences``)."""
    return max(map(len, turn_tokens(sequences).values()), default=0)


def check_trace_calls(tokenizer, example, inputs, tool_call_format, max_call_chars=MAX_CALL_CHARS):
    """Raise a one-line ``DataFormatError`` when a trace turn's tool calls do not read back from their rendered
    tokens as written (``chat.trace_call_mismatch``, calls of at most ``max_call_chars``): its SFT term would teach
    calls that run differently."""
    mismatch = trace_call_mismatch(tokenizer, example, inputs.sft, tool_call_format, max_call_chars)
    if mismatch:
        hint = " (the compact format writes values as bare text: use rollout.tool_call_format=hermes, with a " \
            "pretrained model, whose tokenizer can write JSON)" if tool_call_format == "compact" else ""
        raise DataFormatError(f"{example.where()}: {mismatch}; the SFT term would teach calls the rollout runs "
                              f"differently{hint}")


def check_rollout_caps(example, lim):
    """Raise a one-line ``DataFormatError`` when a trace turn makes more tool calls than a rollout runs in one turn
    (``lim.max_calls_per_turn``), or a tool response is longer than a rollout hands over (``lim.max_result_chars``):
    the SFT term would teach calls, or answers from a response, that every episode imitating it gets an error
    observation for."""
    turns = [m for m in example.trace if m["role"] == "assistant"]
    for k, n in enumerate(len(m.get("tool_calls") or []) for m in turns):
        if n > lim.max_calls_per_turn:
            raise DataFormatError(f"{example.where()}: assistant turn {k} makes {n} tool calls, more than the "
                                  f"rollout.max_calls_per_turn={lim.max_calls_per_turn} a rollout runs in one turn "
                                  "(the others are answered 'not run'); raise it")
    for i, m in enumerate(example.trace):
        if m["role"] == "tool" and len(m["content"]) > lim.max_result_chars:
            raise DataFormatError(f"{example.where()}: trace[{i}], a tool response, has {len(m['content']):,} "
                                  f"characters, more than the rollout.max_result_chars={lim.max_result_chars:,} a "
                                  "rollout hands over (a longer one is answered with an error); raise it")


def check_tool_names(example, tool_call_format):
    """Raise a one-line ``DataFormatError`` when a tool ``example`` offers (in ``tools`` or a later user turn) cannot
    be called in ``tool_call_format``: the compact format writes a tool's name and its arguments' names as bare words
    (letters, digits, _), so a call of ``get-weather``, ``math.sqrt`` or with a required ``max-results`` never
    parses. Every episode's call of it fails, and only a trace that calls it reads back wrong (held-out rows and
    ``grpo``'s rows have none)."""
    if tool_call_format != "compact":  # hermes writes names as JSON strings
        return
    for spec in example.tools + [t for m in example.trace if m["role"] == "user" for t in m.get("tools") or []]:
        name, required = spec["function"]["name"], spec["function"]["parameters"].get("required", [])
        call = parse_one(f"{name} ( {' , '.join(f'{k} = 1' for k in required)} )", tool_call_format)
        if not isinstance(call, ToolCall) or call.name != name or list(call.arguments) != required:
            raise DataFormatError(f"{example.where()}: its tool {name!r}, with its required arguments {required}, "
                                  "cannot be called in rollout.tool_call_format=compact, which writes names as "
                                  "letters, digits and _: use rollout.tool_call_format=hermes")


def check_lengths(example, inputs, lim):
    """Raise a one-line ``DataFormatError`` when ``example``'s ``inputs`` (``GroupInputs``) cannot go through a
    step within ``lim`` (``Limits``) even with a one-token response."""
    _check_sampling(example, len(inputs.po_prompt), lim)
    scored = [("trace-conditioned prompt", len(inputs.tc_prompt) + 1)]
    scored += [(f"trace sequence {k}", len(s.input_ids)) for k, s in enumerate(inputs.sft)]
    for what, n in scored:
        if lim.positions is not None and n > lim.positions:
            raise DataFormatError(f"{example.where()}: its {what} needs {n:,} positions, more than the model's "
                                  f"{lim.positions:,} ({lim.positions_name}); shorten the row")
    budget = lim.micro_batch_tokens
    rollout = packed_size([inputs.tc_prompt + [-1], inputs.po_prompt + [-1]])  # -1: any response token
    if rollout > budget:
        raise DataFormatError(f"{example.where()}: its trace-conditioned and prompt-only prompts, with one response "
                              f"token each, pack to {rollout:,} tokens, more than train.micro_batch_tokens="
                              f"{budget:,}; raise it (pact-fast plan says what fits) or shorten the row")
    for k, s in enumerate(inputs.sft):
        if len(s.input_ids) > budget:
            raise DataFormatError(f"{example.where()}: its trace sequence {k} is {len(s.input_ids):,} tokens, more "
                                  f"than train.micro_batch_tokens={budget:,}; raise it (pact-fast plan says what "
                                  "fits) or shorten the trace")


def response_cap(inputs, lim):
    """The most response tokens an episode of a task (``GroupInputs``) can keep within ``lim``: its rollout unit
    (the two prompts, then the response under each: ``packed_size`` of the prompts plus twice the response) within
    the micro-batch budget, the response after the trace-conditioned prompt within the positions, after the
    prompt-only prompt within what the engine samples from. At least 1 for a task ``check_lengths`` passed."""
    caps = [(lim.micro_batch_tokens - packed_size([inputs.tc_prompt, inputs.po_prompt])) // 2]
    if lim.positions is not None:
        caps.append(lim.positions - len(inputs.tc_prompt))
    if lim.sampling is not None:
        caps.append(lim.sampling - len(inputs.po_prompt))
    return min(caps)


def fit_episodes(episodes, inputs, lim):
    """Cut each episode (``rollout.Episode``) whose response is longer than its task's ``response_cap`` to it, as
    one that ran out of length: ``finish`` "length", reward 0 (what an engine gives an episode stopped at its
    length limit), its turns and tool counts those of what is left (``_recount``). ``episodes``: a list per task,
    ``inputs`` their ``GroupInputs``. Returns how many were cut: a step then packs every unit within the budget,
    where one long episode used to stop the run."""
    cut = 0
    for eps, gi in zip(episodes, inputs):
        cap = response_cap(gi, lim)
        for ep in eps:
            if len(ep.response_ids) > cap:
                _recount(ep, cap)
                del ep.response_ids[cap:], ep.response_mask[cap:], ep.behavior_logp[cap:]
                ep.finish, ep.reward = "length", 0.0
                cut += 1
    return cut


def _sampled_spans(mask):
    """[(start, end)] of each run of sampled tokens (mask 1) in a response mask: one per turn."""
    spans, start = [], None
    for i, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append((start, i))
            start = None
    return spans


def _recount(ep, cap):
    """An episode's ``turns`` after cutting its response to ``cap`` tokens (the turns that sampled a token before
    it) and its ``tool_calls`` / ``tool_errors`` (those of turns whose whole text is kept), from its per-turn
    ``turn_tools``. Counts that the response mask and ``turn_tools`` do not bear out stay as they are (an engine
    of the user's)."""
    spans = _sampled_spans(ep.response_mask)
    if len(spans) != ep.turns or len(ep.turn_tools) != ep.turns:
        return
    ep.turn_tools = [tools if end <= cap else (0, 0) for (start, end), tools in zip(spans, ep.turn_tools)
                     if start < cap]
    ep.turns = len(ep.turn_tools)
    ep.tool_calls = sum(calls for calls, _ in ep.turn_tools)
    ep.tool_errors = sum(errors for _, errors in ep.turn_tools)


def _check_sampling(example, prompt_len, lim):
    if lim.sampling is not None and prompt_len + 1 > lim.sampling:
        raise DataFormatError(f"{example.where()}: its prompt and one sampled token need {prompt_len + 1:,} "
                              f"positions, more than {lim.sampling_name}={lim.sampling:,}; shorten the row")


def unrewardable(examples, lim):
    """The ``examples`` whose episodes could never be rewarded within ``lim.max_turns`` assistant turns
    (``envs.min_turns``: one per user turn, one more where the expert calls tools). They still train the SFT term,
    so they are said, not refused: their rollouts earn 0 and give the RL terms nothing."""
    if lim.max_turns is None:
        return []
    return [ex for ex in examples if min_turns(ex) > lim.max_turns]


def prepare(tokenizer, train_set, held_out, lim, *, on_error="raise", log=None, tool_call_format=None):
    """``(train_set, held_out)`` once every training task's ``GroupInputs`` passed ``check_lengths`` and
    ``check_rollout_caps`` (and, given
    the run's ``tool_call_format``, ``check_trace_calls``) and every held-out prompt fits ``lim.sampling`` (and,
    given that format, every task passed ``check_tool_names``).
    ``on_error="raise"``: the first task that fails is a ``DataFormatError``; ``"skip"``: failing tasks are left
    out and ``log``-ged as a count with the first reason (none left of a non-empty split is still an error).
    ``log``: also a progress line every PROGRESS_EVERY_S seconds on a large data set, and how many expert turns
    are longer than ``lim.max_new_tokens``."""
    start = last = time.perf_counter()
    skipped = {"training": [], "held-out": []}  # reasons

    def keep(examples, check, what):
        def progress(done):
            nonlocal last
            if log is not None and time.perf_counter() - last > PROGRESS_EVERY_S:
                last = time.perf_counter()
                log(f"[pact_fast] checked {done:,} of {len(examples):,} {what} tasks ({last - start:.0f} s)")

        return keep_rows(examples, check, on_error, lambda _, reason: skipped[what].append(reason), progress)

    long_turns = []  # (example, tokens of its longest expert turn) past rollout.max_new_tokens

    def check_training(ex):
        check_special_text(tokenizer, ex)
        check_tool_names(ex, tool_call_format)
        try:
            inputs = group_inputs(tokenizer, ex)
        except DataFormatError:
            raise
        except Exception as exc:  # a template may raise anything (jinja2's errors) on content it does not expect
            raise DataFormatError(f"{ex.where()}: the chat template cannot render it ({type(exc).__name__}: "
                                  f"{' '.join(str(exc).split())})") from None
        check_known_tokens(tokenizer, ex, [inputs.tc_prompt] + [s.input_ids for s in inputs.sft], "prompt or trace")
        check_lengths(ex, inputs, lim)
        check_rollout_caps(ex, lim)
        if tool_call_format is not None:
            check_trace_calls(tokenizer, ex, inputs, tool_call_format, lim.max_call_chars)
        longest = longest_turn(inputs.sft)
        if lim.max_new_tokens is not None and longest > lim.max_new_tokens:
            long_turns.append((ex, longest))

    def check_held_out(ex):
        check_special_text(tokenizer, ex)
        check_tool_names(ex, tool_call_format)
        ids = prompt_ids(tokenizer, ex)
        check_known_tokens(tokenizer, ex, [ids], "prompt")
        _check_sampling(ex, len(ids), lim)

    train_kept = keep(train_set, check_training, "training")
    kept_held_out = keep(held_out, check_held_out, "held-out")
    if long_turns and log is not None:
        kept_ids = {id(ex) for ex in train_kept}
        long_turns = [(ex, n) for ex, n in long_turns if id(ex) in kept_ids]
        if long_turns:
            ex, n = long_turns[0]
            log(f"[pact_fast] {len(long_turns)} of {len(train_kept)} training tasks have an expert turn longer than "
                f"rollout.max_new_tokens={lim.max_new_tokens} (first: {ex.where()}, {n} tokens): an episode that "
                "imitates it is cut there and earns 0; raise rollout.max_new_tokens")
    for what, reasons in skipped.items():
        if reasons and log is not None:
            log(f"[pact_fast] {len(reasons)} {what} rows skipped (data.on_error=skip); first: {reasons[0]}")
    for what, kept in (("training", train_kept), ("held-out", kept_held_out)):
        short = unrewardable(kept, lim)
        if short and log is not None:
            log(f"[pact_fast] {len(short)} of {len(kept)} {what} tasks need more assistant turns than "
                f"rollout.max_turns={lim.max_turns} to be rewarded (first: {short[0].where()}, "
                f"{min_turns(short[0])} turns): their episodes earn 0; raise rollout.max_turns")
    for what, before, after in (("training", train_set, train_kept), ("held-out", held_out, kept_held_out)):
        if before and not after:
            raise DataFormatError(f"no {what} row fits a step ({len(before)} skipped); first: {skipped[what][0]}")
    return train_kept, kept_held_out


__all__ = ["GroupInputs", "Limits", "limits", "group_inputs", "check_known_tokens", "check_lengths",
           "check_trace_calls", "check_rollout_caps", "check_special_text", "check_tool_names", "longest_turn",
           "response_cap", "fit_episodes", "prepare", "unrewardable", "PROGRESS_EVERY_S"]
