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
``render(conv[:k], add_generation_prompt=True)``, up to its end-of-turn token (the eos token, where a rollout
stops sampling; ChatML's newline after it is context); rendering the same turn without its reasoning
(or without its tool calls) shows which characters those produced. A template that is not
prefix-preserving (one that drops earlier turns' reasoning, say) yields one sequence per
assistant turn, each labelling only its last turn; the trie then shares whatever prefix they have.

Many chat templates ignore ``tools``, ``tool_calls`` or ``reasoning_content`` (SmolLM2's does): the
prompt then shows no tools and the trace renders as empty assistant turns. ``probe_chat_template``
renders a small tool conversation and lists what the template loses; ``resolve_chat_template``
keeps the model's template, switches to the built-in tool format, or refuses, per
``chat_template = auto | model | builtin``; ``check_trace_components`` is the check before
training that every trace turn's tool calls and reasoning became tokens.

The built-in tool format (``builtin_chat_template``), ChatML turns ending with the tokenizer's
end-of-sequence token::

    <|im_start|>system
    {system text}

    You can call these tools:
    {one JSON function spec per line}
    To call a tool, write <tool_call> name ( key = value , ... ) </tool_call>. ...<|im_end|>
    <|im_start|>user
    {task}<|im_end|>
    <|im_start|>assistant
    <think>
    {reasoning}
    </think>
    {content}
    <tool_call> lookup ( entity = maya ) </tool_call><|im_end|>
    <|im_start|>tool
    <tool_response>
    {result}
    </tool_response><|im_end|>

Calls follow ``rollout.tool_call_format``: ``compact`` as above, ``hermes`` as
``<tool_call>\n{"name": "lookup", "arguments": {"entity": "maya"}}\n</tool_call>``.
"""
import copy
import json
import re
from dataclasses import dataclass

from .losses import NONE, OTHER, REASONING, TOOL_CALL, TOOL_RESPONSE
from .toolcalls import MAX_CALL_CHARS, PARSERS, ToolCall, parse_tool_calls


@dataclass
class TraceContextTemplate:
    """How the expert trace is written into the privileged context (``{...}`` are filled in)."""

    header: str = "[ privileged expert trace ]"
    reasoning: str = "reasoning : {text}"
    tool_call: str = "call : {name} ( {args} )"
    tool_result: str = "result : {text}"
    user: str = "user : {text}"
    answer: str = "answer : {text}"
    note: str = "note : {text}"  # the text of a turn that also calls tools, written before its calls
    footer: str = "[ end trace ]"
    separator: str = " "
    placement: str = "\n\n{prompt}{separator}{trace}"  # appended to the last user message

    def render(self, trace):
        parts = [self.header]
        for m in trace:
            if m["role"] == "assistant":
                if m.get("reasoning_content"):
                    parts.append(self.reasoning.format(text=m["reasoning_content"]))
                calls = m.get("tool_calls") or []
                if m.get("content"):  # in the turn's order: its text, then its calls (an answer has none)
                    parts.append((self.note if calls else self.answer).format(text=m["content"]))
                for c in calls:
                    args = " , ".join(f"{k} = {_arg_text(v)}" for k, v in c["function"]["arguments"].items())
                    parts.append(self.tool_call.format(name=c["function"]["name"], args=args))
            elif m["role"] == "tool":
                parts.append(self.tool_result.format(text=m["content"]))
            elif m["role"] == "user":
                parts.append(self.user.format(text=m["content"]))
        parts.append(self.footer)
        return self.separator.join(parts)


def _arg_text(value):
    """A call argument as the privileged trace writes it: a string as it is, anything else as JSON (``true``,
    ``null``, ``{"a": 1}``, as a JSON call format writes it; Python's ``True``, ``None``, ``{'a': 1}`` taught
    another syntax). The compact format's calls hold strings and integers alone (``task_inputs.check_trace_calls``),
    which render alike either way."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


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
    """Label assistant turn ``conv[k]`` in ``render(conv[:k+1])``; fills char arrays; returns that text. The turn ends
    with its end-of-turn token, where a rollout stops sampling: what the template writes after it (ChatML's newline)
    is context."""
    full = render(tokenizer, conv[: k + 1], tools, False, **kw)
    start = _common_prefix(full, render(tokenizer, conv[:k], tools, True, **kw))
    eos = tokenizer.eos_token
    end = full.rfind(eos, start) if eos else -1
    for i in range(start, end + len(eos) if end >= 0 else len(full)):
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


# ---------------------------------------------------------------- templates that carry tools

CHAT_TEMPLATE_MODES = ("auto", "model", "builtin")

_CALL_SYNTAX = {
    "compact": ("<tool_call> {{ c.function.name }} ("
                "{% for k, v in c.function.arguments.items() %} {{ k }} = {{ v }}{% if not loop.last %} ,{% endif %}"
                "{% endfor %} ) </tool_call>",
                "To call a tool, write <tool_call> name ( key = value , ... ) </tool_call>."),
    "hermes": ("<tool_call>\n{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}\n</tool_call>",
               'To call a tool, write <tool_call>\n{"name": <tool name>, "arguments": <arguments object>}\n'
               '</tool_call>.'),
}


TURN_START = "<|im_start|>"  # what opens every turn of the built-in format


def builtin_chat_template(tool_call_format="compact", *, turn_start=TURN_START, turn_end="<|im_end|>", bos=""):
    """The project's tool format as a Jinja chat template (module docstring): tools in the system turn, calls
    in ``tool_call_format``, responses as ``tool`` turns, reasoning in ``<think>`` in the assistant turn.
    Prefix-preserving across turns. ``turn_end`` must be the token that ends an assistant turn in rollouts
    (the tokenizer's end-of-sequence token); ``bos``, the text every rendering starts with (``expected_bos``)."""
    if tool_call_format not in _CALL_SYNTAX:
        raise ValueError(f"builtin_chat_template: unknown tool_call_format {tool_call_format!r}; "
                         f"choose one of {sorted(_CALL_SYNTAX)}")
    call, how = _CALL_SYNTAX[tool_call_format]
    s, e = turn_start, turn_end
    # no whitespace control: every character is literal, except that Jinja (trim_blocks, as transformers sets
    # it) drops a newline right after a block tag, so those newlines are written as expressions
    nl = "{{ '\\n' }}"
    return (
        "{{ " + repr(bos) + " }}"
        "{% set ns = namespace(system='') %}"
        "{% for m in messages %}{% if m.role == 'system' %}"
        "{% set ns.system = ns.system + ('\\n\\n' if ns.system else '') + m.content %}{% endif %}"
        "{% endfor %}"
        "{% if ns.system or tools %}"
        f"{s}system\n{{{{ ns.system }}}}"
        f"{{% if tools %}}{{% if ns.system %}}{nl}{nl}{{% endif %}}You can call these tools:\n"
        f"{{% for t in tools %}}{{{{ t.function | tojson }}}}{nl}{{% endfor %}}"
        f"{how} Tool results come back in tool turns; think inside <think> </think> first."
        "{% endif %}"
        f"{e}\n"
        "{% endif %}"
        "{% for m in messages %}"
        f"{{% if m.role == 'user' %}}{s}user\n{{{{ m.content }}}}{e}\n"
        f"{{% elif m.role == 'assistant' %}}{s}assistant\n"
        f"{{% if m.reasoning_content %}}<think>\n{{{{ m.reasoning_content }}}}\n</think>{nl}{{% endif %}}"
        "{% if m.content %}{{ m.content }}{% endif %}"
        f"{{% for c in m.tool_calls or [] %}}{{% if m.content or not loop.first %}}{nl}{{% endif %}}"
        f"{call}{{% endfor %}}{e}\n"
        f"{{% elif m.role == 'tool' %}}{s}tool\n<tool_response>\n{{{{ m.content }}}}\n</tool_response>{e}\n"
        "{% endif %}"
        "{% endfor %}"
        f"{{% if add_generation_prompt %}}{s}assistant\n{{% endif %}}"
    )


_PROBE_TOOLS = [{"type": "function", "function": {
    "name": "probe_lookup", "description": "looks a fact up",
    "parameters": {"type": "object", "properties": {"probe_key": {"type": "string"}}, "required": ["probe_key"]}}}]
_PROBE_CALL = {"id": "call0", "type": "function",
               "function": {"name": "probe_lookup", "arguments": {"probe_key": "walrus"}}}
_PROBE = [{"role": "system", "content": "You answer with tools."},
          {"role": "user", "content": "Which fact is it?"},
          {"role": "assistant", "content": "", "reasoning_content": "I should look the walrus fact up.",
           "tool_calls": [_PROBE_CALL]},
          {"role": "tool", "tool_call_id": "call0", "content": "tusks"},
          {"role": "assistant", "content": "tusks"}]


def probe_chat_template(tokenizer, tool_call_format="compact", *, reasoning=True, call_text=True):
    """What the tokenizer's chat template loses of a tool conversation: a list of one-line problems (empty:
    the template carries tools, calls in ``tool_call_format``, tool responses, reasoning if ``reasoning``, the
    text of a turn that calls tools if ``call_text``, and is prefix-preserving across a tool turn, as rollouts
    need)."""
    if tool_call_format not in PARSERS:
        raise ValueError(f"probe_chat_template: unknown tool_call_format {tool_call_format!r}; "
                         f"choose one of {sorted(PARSERS)}")
    if not getattr(tokenizer, "chat_template", None):
        return ["the tokenizer has no chat template"]
    try:
        plain = render(tokenizer, _PROBE[:2], _PROBE_TOOLS, False)
        prompt = render(tokenizer, _PROBE[:2], _PROBE_TOOLS, True)
        first = render(tokenizer, _PROBE[:3], _PROBE_TOOLS, False)
        bare = render(tokenizer, _PROBE[:2] + [{k: v for k, v in _PROBE[2].items() if k != "reasoning_content"}],
                      _PROBE_TOOLS, False)  # as a rollout's turns come: without the key
        said = render(tokenizer, _PROBE[:2] + [dict(_PROBE[2], content="Checking the walrus records.")],
                      _PROBE_TOOLS, False)
        with_tool = render(tokenizer, _PROBE[:4], _PROBE_TOOLS, True)
        tool_turn = render(tokenizer, _PROBE[:4], _PROBE_TOOLS, False)
        whole = render(tokenizer, _PROBE, _PROBE_TOOLS, False)
    except Exception as exc:  # a template may raise anything on roles or fields it does not know
        return [f"the template cannot render a tool conversation ({type(exc).__name__}: {exc})"]
    problems = []
    if "probe_lookup" not in prompt or "probe_key" not in prompt:
        problems.append("the prompt does not show the tools (name and parameters)")
    preserved = with_tool.startswith(first) and whole.startswith(tool_turn)  # the tool turn, once the answer comes
    if not (first.startswith(prompt) and bare.startswith(prompt)) or (preserved and not whole.startswith(with_tool)):
        problems.append("an assistant turn as rendered does not start with the generation prompt (a pre-filled <think> "
                        "that rendered turns lack, as in QwQ's and DeepSeek-R1's templates): rollouts sample after it")
    turn = first[len(prompt) if first.startswith(prompt) else _common_prefix(first, plain):]
    calls = parse_tool_calls(turn, tool_call_format)
    if calls != [ToolCall("probe_lookup", {"probe_key": "walrus"})]:
        problems.append(f"the assistant turn shows no tool call in the {tool_call_format!r} format "
                        "(rollout.tool_call_format must match the template's)")
    if reasoning and "walrus fact up" not in first:
        problems.append("the assistant turn drops reasoning_content")
    if call_text and "Checking the walrus records." not in said:
        problems.append("an assistant turn that calls tools drops its text (content)")
    if tokenizer.eos_token and tokenizer.eos_token not in turn:
        problems.append(f"the assistant turn does not end with the tokenizer's eos token {tokenizer.eos_token!r}, "
                        "where rollouts stop sampling a turn (a base model's tokenizer under an instruct template)")
    if "tusks" not in with_tool[len(first):]:
        problems.append("the tool response is not rendered")
    if not preserved:
        problems.append("the template is not prefix-preserving across a tool turn (rollouts append tool turns)")
    elif not problems:
        problems += _rollout_problems(tokenizer, turn)
    return problems


def _rollout_problems(tokenizer, turn):
    """What a rollout would meet that the structured probe does not show: the engine appends each sampled turn as
    raw text (reasoning, if any, inside it) and then the tool or user turn, and needs the text so far to stay a
    prefix. Checked for a call turn with reasoning, without it and with an empty ``<think>``, and for a user turn
    after a final answer (Qwen3's template, for one, drops an earlier turn's reasoning once a new user turn comes,
    and gives a last turn without reasoning an empty ``<think>`` it takes away once a tool turn follows)."""
    call = turn.split("</think>")[-1]
    if tokenizer.eos_token:
        call = call.split(tokenizer.eos_token)[0]
    call = call.strip()
    tool = {"role": "tool", "tool_call_id": "call0", "content": "tusks"}
    cases = {"a call turn with reasoning": (f"<think>\nI look it up.\n</think>\n\n{call}", tool),
             "a call turn without reasoning": (call, tool),
             "a call turn with an empty <think>": (f"<think>\n\n</think>\n\n{call}", tool),
             "a user turn after an answer": ("<think>\nIt is tusks.\n</think>\n\ntusks",
                                             {"role": "user", "content": "And the next one?"})}
    problems = []
    for what, (text, new) in cases.items():
        conv = _PROBE[:2] + [{"role": "assistant", "content": text}]
        try:
            before = render(tokenizer, conv, _PROBE_TOOLS, False)
            after = render(tokenizer, conv + [new], _PROBE_TOOLS, True)
        except Exception as exc:  # a template may raise anything on content it does not expect
            problems.append(f"the template cannot render {what} ({type(exc).__name__}: {exc})")
            continue
        if not after.startswith(before):
            problems.append(f"the template re-renders {what} once the next turn comes (rollouts append turns)")
    return problems


def expected_bos(tokenizer):
    """The begin-of-sequence token's text the model's inputs start with ("" for none): where the tokenizer puts one
    in front when it encodes text (Llama 3, Mistral, Gemma), or its chat template writes one. Text is encoded
    without special tokens here (``encode``), so the built-in format must write it, or such a model trains and
    samples without the token it always saw first."""
    bos = tokenizer.bos_token
    if not bos or tokenizer.bos_token_id is None or bos == tokenizer.eos_token:  # GPT-2's: turns end with it
        return ""
    if bos == TURN_START:  # SmolLM2's: the built-in format's turn start, which begins every rendering already
        return ""
    adds = tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    return bos if adds or "bos_token" in str(getattr(tokenizer, "chat_template", None) or "") else ""


def resolve_chat_template(tokenizer, mode="auto", tool_call_format="compact", *, reasoning=True, call_text=True,
                          log=print):
    """Make ``tokenizer.chat_template`` one that carries tools; returns ``"model"`` or ``"builtin"``.

    mode: ``auto`` keeps the model's template when ``probe_chat_template`` finds no problem, else installs
        ``builtin_chat_template`` (and says why through ``log``); ``model`` keeps it or raises a one-line
        ``ValueError`` with the problems; ``builtin`` always installs the built-in format.
    reasoning: whether the data has reasoning, so that a template dropping it is a problem.
    call_text: whether the data has text in turns that call tools, likewise.
    """
    if mode not in CHAT_TEMPLATE_MODES:
        raise ValueError(f"chat_template={mode!r}; choose one of {', '.join(CHAT_TEMPLATE_MODES)}")
    if mode != "builtin":
        problems = probe_chat_template(tokenizer, tool_call_format, reasoning=reasoning, call_text=call_text)
        if not problems:
            return "model"
        if mode == "model":
            raise ValueError("chat_template=model, but the model's chat template cannot be trained on tool use: "
                             + "; ".join(problems) + " (use chat_template=auto or builtin)")
        if log:
            log("[pact_fast] the model's chat template cannot carry tool use (" + "; ".join(problems)
                + f"): using the built-in tool format ({tool_call_format} calls) instead")
    if tokenizer.eos_token is None:
        raise ValueError("the built-in tool format ends turns with the tokenizer's eos token, and it has none")
    tokenizer.chat_template = builtin_chat_template(tool_call_format, turn_end=tokenizer.eos_token,
                                                    bos=expected_bos(tokenizer))
    problems = probe_chat_template(tokenizer, tool_call_format, reasoning=reasoning, call_text=call_text)
    if problems:
        raise ValueError("the built-in tool format does not render with this tokenizer: " + "; ".join(problems))
    return "builtin"


def _call_text(call):
    """``name({json arguments})`` of a ToolCall, or the reason of a ToolCallError: types kept apart (``true`` is not
    ``1``, ``[1]`` is not ``"[1]"``)."""
    if not isinstance(call, ToolCall):
        return f"an error ({call.reason})"
    return f"{call.name}({json.dumps(call.arguments, sort_keys=True, ensure_ascii=False)})"


def turn_tokens(sequences):
    """{assistant turn: its tokens (reasoning, calls, answer and end)} of ``sequences`` (``trace_sequences``
    output), each turn from the first sequence that labels it (per-turn sequences label only their own turn)."""
    out = {}
    for s in sequences:
        mine = {}
        for token, comp, turn in zip(s.input_ids, s.components, s.turn_ids):
            if comp in (REASONING, TOOL_CALL, OTHER):
                mine.setdefault(turn, []).append(token)
        for turn, tokens in mine.items():
            out.setdefault(turn, tokens)
    return out


def trace_call_mismatch(tokenizer, example, sequences, tool_call_format, max_call_chars=MAX_CALL_CHARS):
    """How the first of the trace's tool-call turns reads back, or None when every one does: each assistant turn
    with ``tool_calls``, decoded from its labelled tokens in ``sequences`` (``trace_sequences`` output) as a
    rollout decodes a sampled turn and parsed in ``tool_call_format`` (a call's text at most ``max_call_chars``,
    ``rollout.max_call_chars``), must give the trace's calls, names,
    arguments and their JSON types. Where it does not (the compact format writes ``True``, ``[1, 2]`` or a
    comma inside a value as bare text), the SFT term teaches calls that the rollout would run differently.
    Returns a one-line description: the turn, the calls as written and as read back."""
    tokens = turn_tokens(sequences)
    turns = [m for m in example.trace if m["role"] == "assistant"]
    for k, msg in enumerate(turns):
        if not msg.get("tool_calls"):
            continue
        written = [ToolCall(c["function"]["name"], c["function"]["arguments"]) for c in msg["tool_calls"]]
        read = parse_tool_calls(tokenizer.decode(tokens.get(k, []), skip_special_tokens=False), tool_call_format,
                                max_call_chars)
        if [_call_text(c) for c in read] != [_call_text(c) for c in written]:
            return (f"assistant turn {k}'s tool calls, rendered and read back in rollout.tool_call_format="
                    f"{tool_call_format!r}, are {_cut('; '.join(map(_call_text, read)) or 'no call')}, not "
                    f"{_cut('; '.join(map(_call_text, written)))}")
    return None


def _cut(text, limit=160):
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def check_trace_components(example, sequences):
    """Raise a one-line ``ValueError`` naming the example when a trace turn's tool calls (or reasoning), or
    the trace's tool responses, produced no labelled tokens in ``sequences`` (``trace_sequences`` output)."""
    have = {}
    for s in sequences:
        for comp, turn in zip(s.components, s.turn_ids):
            if comp in (REASONING, TOOL_CALL):
                have[(comp, turn)] = True
            elif comp == TOOL_RESPONSE:
                have[TOOL_RESPONSE] = True
    turns = [m for m in example.trace if m["role"] == "assistant"]
    for k, msg in enumerate(turns):
        if msg.get("tool_calls") and (TOOL_CALL, k) not in have:
            raise ValueError(f"example {example.id!r}: assistant turn {k} has {len(msg['tool_calls'])} tool call(s) "
                             "but no tool-call tokens in the rendered trace (the chat template drops tool_calls; "
                             "use chat_template=auto or builtin)")
        if (msg.get("reasoning_content") or "").strip() and (REASONING, k) not in have:
            raise ValueError(f"example {example.id!r}: assistant turn {k} has reasoning but no reasoning tokens in "
                             "the rendered trace (the chat template drops reasoning_content; use chat_template=auto "
                             "or builtin)")
    if any(m["role"] == "tool" for m in example.trace) and TOOL_RESPONSE not in have:
        raise ValueError(f"example {example.id!r}: the trace has tool responses but the rendered trace shows none")
