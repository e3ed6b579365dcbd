"""Rendering and tokenization of prompts and expert traces with any chat template that takes tools.

- ``prompt_ids``: the prompt-only prompt ``x`` (with the generation prompt);
- ``trace_conditioned_prompt_ids``: the same prompt with the expert trace inserted as privileged
  context (appended to the last user message, through a configurable ``TraceContextTemplate``),
  so that both prompts share the long prefix of system text, tools and task;
- ``trace_sequences``: the trace as assistant turns, with per-token component labels
  (``pact_fast.losses.REASONING``, ``TOOL_CALL``, ``TOOL_RESPONSE``, ``OTHER``, ``NONE``),
  reasoning segment ids and turn ids.

Labels come from character offsets of the rendered text, never from guesses about token
boundaries: the span of assistant turn k is what ``render(conv[:k+1])`` adds after
``render(conv[:k], add_generation_prompt=True)``; rendering the same turn without its reasoning
(or without its tool calls) shows which characters those produced. A template that is not
prefix-preserving (one that drops earlier turns' reasoning, say) yields one sequence per
assistant turn, each labelling only its last turn; the trie then shares whatever prefix they have.
"""
import copy
import re
from dataclasses import dataclass

from .losses import NONE, OTHER, REASONING, TOOL_CALL, TOOL_RESPONSE


@dataclass
class TraceContextTemplate:
    """How the expert trace is written into the privileged context (``{...}`` are filled in)."""

    header: str = "[ privileged expert trace ]"
    reasoning: str = "reasoning : {text}"
    tool_call: str = "call : {name} ( {args} )"
    tool_result: str = "result : {text}"
    user: str = "user : {text}"
    answer: str = "answer : {text}"
    footer: str = "[ end trace ]"
    separator: str = " "
    placement: str = "\n\n{prompt}{separator}{trace}"  # appended to the last user message

    def render(self, trace):
        parts = [self.header]
        for m in trace:
            if m["role"] == "assistant":
                if m.get("reasoning_content"):
                    parts.append(self.reasoning.format(text=m["reasoning_content"]))
                for c in m.get("tool_calls") or []:
                    args = " , ".join(f"{k} = {v}" for k, v in c["function"]["arguments"].items())
                    parts.append(self.tool_call.format(name=c["function"]["name"], args=args))
                if m.get("content"):
                    parts.append(self.answer.format(text=m["content"]))
            elif m["role"] == "tool":
                parts.append(self.tool_result.format(text=m["content"]))
            elif m["role"] == "user":
                parts.append(self.user.format(text=m["content"]))
        parts.append(self.footer)
        return self.separator.join(parts)


@dataclass
class LabeledSequence:
    """A tokenized trace sequence; lists of equal length."""

    input_ids: list
    components: list  # per token: NONE / REASONING / TOOL_CALL / TOOL_RESPONSE / OTHER
    segment_ids: list  # per token: reasoning segment index within its turn (0 elsewhere)
    turn_ids: list  # per token: assistant turn index (0 where not an assistant token)


def render(tokenizer, messages, tools=None, add_generation_prompt=False, **template_kwargs):
    return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                         add_generation_prompt=add_generation_prompt, **template_kwargs)


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer, example, **template_kwargs):
    """Token ids of the prompt-only prompt, ending with the generation prompt."""
    return encode(tokenizer, render(tokenizer, example.messages, example.tools, True, **template_kwargs))


def trace_conditioned_messages(example, template=None):
    """The prompt messages with the trace appended to the last user message as privileged context."""
    template = template or TraceContextTemplate()
    messages = copy.deepcopy(example.messages)
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    messages[last_user]["content"] = template.placement.format(
        prompt=messages[last_user]["content"], separator=template.separator,
        trace=template.render(example.trace)).lstrip("\n")
    return messages


def trace_conditioned_prompt_ids(tokenizer, example, template=None, **template_kwargs):
    """Token ids of the trace-conditioned prompt ``(x, h)``, ending with the generation prompt."""
    messages = trace_conditioned_messages(example, template)
    return encode(tokenizer, render(tokenizer, messages, example.tools, True, **template_kwargs))


def reasoning_segments(text):
    """Character spans of reasoning segments: paragraphs if there are several, else sentences."""
    paragraphs = [m.span() for m in re.finditer(r"\S(?:.*?\S)??(?=\s*\n\s*\n|\s*$)", text, flags=re.S)]
    if len(paragraphs) > 1:
        return paragraphs
    return [m.span() for m in re.finditer(r"\S.*?(?:[.!?](?=\s|$)|$)", text, flags=re.S)]


def _common_prefix(a, b):
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _diff_region(tokenizer, with_part, without_part, starts_with=None):
    """[start, end) characters of ``with_part`` that ``without_part`` lacks, as whole tokens: the tokens left
    between the longest common token prefix and suffix of the two renderings (character-wise diffs would
    absorb characters the two happen to share at the edges, such as the ``<`` of two different tags).

    An insertion between repeated delimiters can be aligned several ways (``<|im_end|> <|im_start|> tool ...``
    shifts by a token); with ``starts_with`` (a token id) the alignment starting with that token is chosen."""
    a = tokenizer(with_part, add_special_tokens=False, return_offsets_mapping=True)
    b = tokenizer(without_part, add_special_tokens=False)["input_ids"]
    ids, offsets = a["input_ids"], a["offset_mapping"]
    p = _common_prefix(ids, b)
    s = 0
    while s < min(len(ids), len(b)) - p and ids[-1 - s] == b[-1 - s]:
        s += 1
    end = len(ids) - s
    if p >= end:
        return 0, 0
    if starts_with is not None:
        shift = 0
        while p - shift > 0 and ids[p - shift - 1] == ids[end - shift - 1]:
            shift += 1
        for d in range(shift, -1, -1):  # leftmost alignment that starts with the turn-start token
            if ids[p - d] == starts_with:
                p, end = p - d, end - d
                break
    return offsets[p][0], offsets[end - 1][1]


def _turn_start_token(tokenizer, conv, tools, kw):
    """First token of the generation prompt: the token that opens every turn in the template."""
    plain = render(tokenizer, conv, tools, False, **kw)
    prompt = render(tokenizer, conv, tools, True, **kw)
    ids = tokenizer(prompt[len(plain):], add_special_tokens=False)["input_ids"] if prompt.startswith(plain) else []
    return ids[0] if ids else None


def _label_turn(tokenizer, conv, k, tools, kw, labels, segments):
    """Label assistant turn ``conv[k]`` in ``render(conv[:k+1])``; fills char arrays; returns that text."""
    full = render(tokenizer, conv[: k + 1], tools, False, **kw)
    start = _common_prefix(full, render(tokenizer, conv[:k], tools, True, **kw))
    for i in range(start, len(full)):
        labels[i] = OTHER
    msg = conv[k]
    reasoning = msg.get("reasoning_content")
    if reasoning:
        stripped = dict(msg, reasoning_content=None)
        a, b = _diff_region(tokenizer, full, render(tokenizer, conv[:k] + [stripped], tools, False, **kw))
        at = full.find(reasoning.strip(), a, b) if a < b else -1
        if at >= 0:
            body = reasoning.strip()
            for seg, (s, e) in enumerate(reasoning_segments(body)):
                for i in range(at + s, at + e):
                    labels[i] = REASONING
                    segments[i] = seg
    if msg.get("tool_calls"):
        stripped = {key: v for key, v in msg.items() if key != "tool_calls"}
        a, b = _diff_region(tokenizer, full, render(tokenizer, conv[:k] + [stripped], tools, False, **kw))
        for i in range(max(a, start), b):
            labels[i] = TOOL_CALL
    return full


def _label_tool(tokenizer, conv, j, tools, kw, text, labels, turn_start):
    """Label tool message ``conv[j]`` inside ``text`` (a rendering of a conversation that contains it): the
    tokens that rendering the same conversation without that message removes."""
    without = render(tokenizer, conv[:j] + conv[j + 1:], tools, False, **kw)
    a, b = _diff_region(tokenizer, text, without, starts_with=turn_start)
    for i in range(a, b):
        labels[i] = TOOL_RESPONSE


def _tokenize_labeled(tokenizer, text, labels, segments, turns):
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    comp, seg, turn = [], [], []
    for s, e in enc["offset_mapping"]:
        pos = next((i for i in range(s, e) if not text[i].isspace()), s) if e > s else s
        pos = min(pos, len(text) - 1)
        comp.append(labels[pos])
        seg.append(segments[pos])
        turn.append(turns[pos])
    return LabeledSequence(enc["input_ids"], comp, seg, turn)


def trace_sequences(tokenizer, example, **template_kwargs):
    """The expert trace as assistant turns after the prompt, tokenized with component labels.

    Returns a list of ``LabeledSequence``: one when the template renders every turn as a prefix of the
    whole conversation, else one per assistant turn (each labels only its own turn).
    """
    conv = list(example.messages) + list(example.trace)
    tools, kw = example.tools, template_kwargs
    whole = render(tokenizer, conv, tools, False, **kw)
    turn_start = _turn_start_token(tokenizer, conv, tools, kw)
    assistant_idx = [i for i, m in enumerate(conv) if m["role"] == "assistant"]
    tool_idx = [i for i, m in enumerate(conv) if m["role"] == "tool"]
    per_turn = []
    prefix_preserving = True
    for turn, k in enumerate(assistant_idx):
        labels, segments = [NONE] * len(whole), [0] * len(whole)
        text = _label_turn(tokenizer, conv, k, tools, kw, labels, segments)
        labels, segments = labels[: len(text)], segments[: len(text)]
        turns = [turn if lab != NONE else 0 for lab in labels]
        for j in tool_idx:
            if j < k:
                _label_tool(tokenizer, conv[: k + 1], j, tools, kw, text, labels, turn_start)
        per_turn.append((text, labels, segments, turns))
        prefix_preserving &= whole.startswith(text)
    if prefix_preserving:
        labels, segments, turns = [NONE] * len(whole), [0] * len(whole), [0] * len(whole)
        for text, lab, seg, trn in per_turn:
            for i, x in enumerate(lab):
                if x in (REASONING, TOOL_CALL, OTHER):
                    labels[i], segments[i], turns[i] = x, seg[i], trn[i]
        for j in tool_idx:
            _label_tool(tokenizer, conv, j, tools, kw, whole, labels, turn_start)
        return [_tokenize_labeled(tokenizer, whole, labels, segments, turns)]
    # each per-turn array labels only its own turn: earlier turns are context there
    return [_tokenize_labeled(tokenizer, text, lab, seg, trn) for text, lab, seg, trn in per_turn]
