import pytest

from pact_fast.chat import (TraceContextTemplate, builtin_chat_template, check_trace_components, probe_chat_template,
                            prompt_ids, reasoning_segments, resolve_chat_template, trace_conditioned_prompt_ids,
                            trace_sequences)
from pact_fast.data import parse_example
from pact_fast.envs import build_tokenizer
from pact_fast.envs.tokenizer import CHAT_TEMPLATE
from pact_fast.losses import NONE, OTHER, REASONING, TOOL_CALL, TOOL_RESPONSE

N, R, C, T, O = NONE, REASONING, TOOL_CALL, TOOL_RESPONSE, OTHER

EXAMPLE = {
    "id": "known",
    "messages": [{"role": "system", "content": "you answer questions with tools ."},
                 {"role": "user", "content": "what is the age of maya ?"}],
    "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"entity": {"type": "string"}, "relation": {"type": "string"}}}}}],
    "trace": [{"role": "assistant", "content": "", "reasoning_content": "i need the age of maya . first i look up .",
               "tool_calls": [{"id": "c1", "function": {"name": "lookup",
                                                        "arguments": {"entity": "maya", "relation": "age"}}}]},
              {"role": "tool", "tool_call_id": "c1", "content": "42"},
              {"role": "assistant", "content": "42", "reasoning_content": "the answer is 42 ."}],
    "answer": "42",
}

# (token, component, segment, turn), written out by hand from the template
EXPECTED = (
    [(t, N, 0, 0) for t in "<|im_start|> system you answer questions with tools . tools : lookup ( entity , relation ) ; "
                             "<|im_end|> <|im_start|> user what is the age of maya ? <|im_end|> <|im_start|> assistant".split()]
    + [("<think>", O, 0, 0)]
    + [(t, R, 0, 0) for t in "i need the age of maya .".split()]
    + [(t, R, 1, 0) for t in "first i look up .".split()]
    + [("</think>", O, 0, 0)]
    + [(t, C, 0, 0) for t in "<tool_call> lookup ( entity = maya , relation = age ) </tool_call>".split()]
    + [("<|im_end|>", O, 0, 0)]
    + [(t, T, 0, 0) for t in "<|im_start|> tool <tool_response> 4 2 </tool_response> <|im_end|>".split()]
    + [(t, N, 0, 0) for t in "<|im_start|> assistant".split()]
    + [("<think>", O, 0, 1)]
    + [(t, R, 0, 1) for t in "the answer is 4 2 .".split()]
    + [("</think>", O, 0, 1), ("4", O, 0, 1), ("2", O, 0, 1), ("<|im_end|>", O, 0, 1)]
)


def test_known_conversation_token_by_token():
    tok = build_tokenizer()
    seqs = trace_sequences(tok, parse_example(EXAMPLE))
    assert len(seqs) == 1, "the built-in template is prefix-preserving: one sequence"
    s = seqs[0]
    got = list(zip(tok.convert_ids_to_tokens(s.input_ids), s.components, s.segment_ids, s.turn_ids))
    assert got == EXPECTED


def test_prompts_share_the_prefix_and_the_trace_sequence_starts_with_the_prompt():
    tok = build_tokenizer()
    ex = parse_example(EXAMPLE)
    po, tc = prompt_ids(tok, ex), trace_conditioned_prompt_ids(tok, ex)
    sft = trace_sequences(tok, ex)[0].input_ids
    assert sft[: len(po)] == po
    question_end = tok.convert_ids_to_tokens(po).index("?") + 1
    assert tc[:question_end] == po[:question_end]
    text = tok.decode(tc)
    assert "privileged expert trace" in text and "call : lookup ( entity = maya , relation = age )" in text
    custom = trace_conditioned_prompt_ids(tok, ex, TraceContextTemplate(header="[ expert ]", footer="[ end ]"))
    assert "[ expert ]" in tok.decode(custom) and "privileged" not in tok.decode(custom)


# Qwen3-style: reasoning of assistant turns before the last message is dropped (not prefix-preserving)
DROPPING_TEMPLATE = CHAT_TEMPLATE.replace(
    "{%- if m.reasoning_content %} <think> {{ m.reasoning_content }} </think>{% endif -%}",
    "{%- if m.reasoning_content and loop.last %} <think> {{ m.reasoning_content }} </think>{% endif -%}")


def test_template_that_drops_earlier_reasoning_still_gives_correct_masks():
    assert DROPPING_TEMPLATE != CHAT_TEMPLATE
    tok = build_tokenizer()
    tok.chat_template = DROPPING_TEMPLATE
    seqs = trace_sequences(tok, parse_example(EXAMPLE))
    assert len(seqs) == 2, "one sequence per assistant turn"
    first, second = ([(t, c, g, u) for t, c, g, u in zip(tok.convert_ids_to_tokens(s.input_ids), s.components,
                                                         s.segment_ids, s.turn_ids)] for s in seqs)
    # turn 0 is the last message of its own sequence: rendered with its reasoning, fully labelled
    assert first == EXPECTED[: EXPECTED.index(("<|im_end|>", O, 0, 0)) + 1]
    # in turn 1's sequence, turn 0 is context (its reasoning dropped by the template): nothing supervised there
    labelled = [x for x in second if x[1] in (R, C, O)]
    assert labelled == [x for x in EXPECTED if x[3] == 1 and x[1] in (R, C, O)]
    assert all(x[0] not in ("need", "first") for x in second), "turn 0's reasoning is not rendered in turn 1's"
    assert [x for x in second if x[1] == T] == [x for x in EXPECTED if x[1] == T]


@pytest.mark.parametrize("text,segments", [
    ("one . two . three .", ["one .", "two .", "three ."]),
    ("para one. still one.\n\npara two.", ["para one. still one.", "para two."]),
    ("no end mark", ["no end mark"]),
])
def test_reasoning_segments(text, segments):
    assert [text[a:b] for a, b in reasoning_segments(text)] == segments


# templates that lose part of a tool conversation, as many pretrained models' templates do
NO_TOOLS_TEMPLATE = CHAT_TEMPLATE.replace("{%- if tools -%}", "{%- if false -%}").replace(
    "{%- if not tools %}", "{%- if true %}")
NO_CALLS_TEMPLATE = CHAT_TEMPLATE.replace("{%- for c in m.tool_calls or [] %}", "{%- for c in [] %}")
NO_REASONING_TEMPLATE = CHAT_TEMPLATE.replace("{%- if m.reasoning_content %}", "{%- if false %}")


@pytest.mark.parametrize("template,problem", [
    pytest.param(NO_TOOLS_TEMPLATE, "does not show the tools", id="tools"),
    pytest.param(NO_CALLS_TEMPLATE, "no tool call in the 'compact' format", id="calls"),
    pytest.param(NO_REASONING_TEMPLATE, "drops reasoning_content", id="reasoning"),
])
def test_probe_names_what_a_template_drops(template, problem):
    assert template != CHAT_TEMPLATE
    tok = build_tokenizer()
    assert probe_chat_template(tok, "compact") == []
    tok.chat_template = template
    problems = probe_chat_template(tok, "compact")
    assert len(problems) == 1 and problem in problems[0]
    if template is NO_REASONING_TEMPLATE:
        assert probe_chat_template(tok, "compact", reasoning=False) == [], "data without reasoning needs none"


# Qwen3-style, on raw assistant text as rollouts append it: a last turn without reasoning gets an empty <think>
# that goes once a turn follows, and a turn's reasoning is dropped once a new user turn comes
EMPTY_THINK_TEMPLATE = CHAT_TEMPLATE.replace(
    "{%- if m.content %} {{ m.content }}{% endif -%}",
    "{%- if loop.last and m.content and '<think>' not in m.content %} <think> </think>{% endif -%}"
    "{%- if m.content %} {{ m.content }}{% endif -%}")
DROPS_ON_USER_TEMPLATE = CHAT_TEMPLATE.replace(
    "{%- if m.content %} {{ m.content }}{% endif -%}",
    "{%- if m.content %} {{ m.content.split('</think>')[-1] if messages[loop.index0:] | selectattr('role', "
    "'equalto', 'user') | list else m.content }}{% endif -%}")


@pytest.mark.parametrize("template,problems", [
    pytest.param(EMPTY_THINK_TEMPLATE, ["a call turn without reasoning"], id="empty-think"),
    pytest.param(DROPS_ON_USER_TEMPLATE, ["a user turn after an answer"], id="drops-reasoning-on-user"),
])
def test_probe_renders_turns_as_rollouts_append_them(template, problems):
    """Qwen3's template passed the probe (structured tool_calls and reasoning_content) and then broke the run:
    rollouts append raw turn text, and a tool call without reasoning, or a later user turn (BFCL), re-rendered an
    earlier turn. The probe now renders those forms; auto falls back to the built-in format on them."""
    tok = build_tokenizer()
    tok.chat_template = template
    found = probe_chat_template(tok, "compact")
    assert [p for p in found if not any(w in p for w in problems)] == [] and all(
        any(w in p for p in found) for w in problems), found
    said = []
    assert resolve_chat_template(tok, "auto", "compact", log=said.append) == "builtin" and "re-renders" in said[0]


def test_probe_refuses_a_template_whose_turns_do_not_end_with_eos():
    """A Qwen3-Base-style tokenizer (eos <|endoftext|>) under a template ending turns with <|im_end|>: the engine
    stops a turn at eos only, so every turn ran to max_new_tokens and ended as "length" (reward 0)."""
    tok = build_tokenizer()
    assert probe_chat_template(tok, "compact") == []
    tok.eos_token = "<|im_start|>"  # a token the template does not end an assistant turn with
    (problem,) = probe_chat_template(tok, "compact")
    assert "does not end with the tokenizer's eos token '<|im_start|>'" in problem


def test_probe_checks_the_call_format_and_rendering_errors():
    tok = build_tokenizer()
    (problem,) = probe_chat_template(tok, "hermes")
    assert "'hermes' format" in problem, "the built-in template writes compact calls"
    tok.chat_template = "{{ raise_exception('no tools here') }}"
    (problem,) = probe_chat_template(tok, "compact")
    assert "cannot render" in problem and "no tools here" in problem


def test_resolve_keeps_a_good_template_and_replaces_or_refuses_a_bad_one():
    tok = build_tokenizer()
    assert resolve_chat_template(tok, "auto", "compact") == "model" and tok.chat_template == CHAT_TEMPLATE
    tok.chat_template = NO_CALLS_TEMPLATE
    with pytest.raises(ValueError, match="chat_template=model.*no tool call"):
        resolve_chat_template(tok, "model", "compact")
    said = []
    assert resolve_chat_template(tok, "auto", "hermes", log=said.append) == "builtin"
    assert tok.chat_template == builtin_chat_template("hermes", turn_end=tok.eos_token)
    assert len(said) == 1 and "cannot carry tool use (the assistant turn shows no tool call" in said[0]
    assert "built-in tool format (hermes calls)" in said[0]
    assert probe_chat_template(tok, "hermes") == []
    tok.chat_template = CHAT_TEMPLATE
    assert resolve_chat_template(tok, "builtin", "compact") == "builtin" and probe_chat_template(tok, "compact") == []
    with pytest.raises(ValueError, match="chat_template='hub'; choose one of auto, model, builtin"):
        resolve_chat_template(tok, "hub")


@pytest.mark.parametrize("template,match", [
    pytest.param(NO_CALLS_TEMPLATE, "assistant turn 0 has 1 tool call", id="calls"),
    pytest.param(NO_REASONING_TEMPLATE, "assistant turn 0 has reasoning", id="reasoning"),
])
def test_check_trace_components_names_the_example(template, match):
    tok = build_tokenizer()
    ex = parse_example(EXAMPLE)
    check_trace_components(ex, trace_sequences(tok, ex))
    tok.chat_template = template
    with pytest.raises(ValueError, match=f"example 'known': {match}"):
        check_trace_components(ex, trace_sequences(tok, ex))


def test_builtin_format_keeps_token_exact_reasoning_and_call_labels():
    """The word-level vocabulary lacks the built-in format's instruction words and ChatML headers (they become
    unknown tokens), but every reasoning and tool-call token keeps the labels written out in EXPECTED."""
    tok = build_tokenizer()
    resolve_chat_template(tok, "builtin", "compact")
    ex = parse_example(EXAMPLE)
    (s,) = trace_sequences(tok, ex)
    check_trace_components(ex, [s])
    got = [x for x in zip(tok.convert_ids_to_tokens(s.input_ids), s.components, s.segment_ids, s.turn_ids)
           if x[1] in (R, C)]
    assert got == [x for x in EXPECTED if x[1] in (R, C)]
    assert [x[0] for x in zip(tok.convert_ids_to_tokens(s.input_ids), s.components) if x[1] == T][1:] == \
        "<tool_response> 4 2 </tool_response> <|im_end|>".split()


def test_the_privileged_trace_keeps_a_turns_order_and_system_messages_stay_apart():
    """A turn's text came after its calls in the privileged trace, called an answer (the trained turn has it
    first); two system messages ran together ("tools .Today is Monday.")."""
    from pact_fast.chat import TraceContextTemplate, builtin_chat_template
    from pact_fast.envs import build_tokenizer

    trace = [{"role": "assistant", "content": "let me check", "tool_calls": [
                 {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": {"entity": "x"}}}]},
             {"role": "tool", "tool_call_id": "c1", "content": "r"},
             {"role": "assistant", "content": "done"}]
    assert TraceContextTemplate().render(trace) == ("[ privileged expert trace ] note : let me check call : lookup ( "
                                                    "entity = x ) result : r answer : done [ end trace ]")
    # arguments other than strings as JSON, the syntax a call is written in (Python's True/None/'...' were not)
    call = {"function": {"name": "f", "arguments": {"ok": True, "opts": {"k": None, "v": [1.5, "é"]}, "n": 3}}}
    assert TraceContextTemplate().render([{"role": "assistant", "tool_calls": [call]}]) == (
        '[ privileged expert trace ] call : f ( ok = true , opts = {"k": null, "v": [1.5, "é"]} , n = 3 ) '
        '[ end trace ]')
    tok = build_tokenizer()
    tok.chat_template = builtin_chat_template()
    text = tok.apply_chat_template([{"role": "system", "content": "a ."}, {"role": "system", "content": "b ."},
                                    {"role": "user", "content": "x"}], tokenize=False)
    assert text.startswith("<|im_start|>system\na .\n\nb .<|im_end|>")


# Hermes-3-style: a tool turn ends "</tool_response><|im_end|>" while it is the last message, and gains a newline
# before <|im_end|> once the assistant answers, so the rendered answer turn does not extend the rollout's context
LAST_TOOL_DIFFERS_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m.role == 'system' %}<|im_start|>system\n{{ m.content }} tools: {{ tools | tojson }}<|im_end|>\n"
    "{% elif m.role == 'user' %}<|im_start|>user\n{{ m.content }}<|im_end|>\n"
    "{% elif m.role == 'assistant' %}<|im_start|>assistant\n"
    "{% if m.reasoning_content %}<think>{{ m.reasoning_content }}</think>{% endif %}{{ m.content or '' }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ {'name': c.function.name, 'arguments': c.function.arguments}"
    " | tojson }}</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif m.role == 'tool' %}<|im_start|>tool\n<tool_response>{{ m.content }}</tool_response>"
    "{{ '' if loop.last else '\\n' }}<|im_end|>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_probe_refuses_a_template_that_renders_a_tool_turn_differently_once_the_answer_follows():
    """Hermes 3's tool-use template (NousResearch) passed the probe with hermes calls: the probe compared the whole
    conversation with the text before the tool turn only. The trace's answer turn after a tool turn was then
    labelled from where the two renderings part, and SFT trained the "\\n<|im_end|><|im_start|>assistant\\n" the
    rollout context already holds as the start of the model's own turn."""
    tok = build_tokenizer()
    tok.chat_template = LAST_TOOL_DIFFERS_TEMPLATE
    (problem,) = probe_chat_template(tok, "hermes")
    assert "not prefix-preserving across a tool turn" in problem
    tok.chat_template = LAST_TOOL_DIFFERS_TEMPLATE.replace("{{ '' if loop.last else '\\n' }}", "")
    assert probe_chat_template(tok, "hermes") == [], "the same template, with a tool turn that renders one way"


# ChatML with hermes calls and reasoning, a newline after each turn's end token
CHATML_TEMPLATE = LAST_TOOL_DIFFERS_TEMPLATE.replace("{{ '' if loop.last else '\\n' }}<|im_end|>", "<|im_end|>\n")


def test_a_turn_is_trained_up_to_its_end_token_and_not_the_newline_after_it(smollm2_dir):
    """A turn's span was everything its rendering adds, "<|im_end|>\\n" included: SFT trained the newline after the
    end-of-turn token as the model's (one token a turn, with every ChatML template and the built-in format), which a
    rollout never samples (it stops at <|im_end|>) and gets as context."""
    from transformers import AutoTokenizer

    from pact_fast.chat import turn_tokens

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    ex = parse_example(EXAMPLE)
    for template in (CHATML_TEMPLATE, builtin_chat_template("hermes", turn_end=tok.eos_token)):
        tok.chat_template = template
        assert probe_chat_template(tok, "hermes") == []
        (s,) = trace_sequences(tok, ex)
        turns = [tok.decode(t) for t in turn_tokens([s]).values()]
        assert [t.endswith(e) for t, e in zip(turns, ("</tool_call><|im_end|>", "42<|im_end|>"))] == [True, True], turns
        after_end = [c for t, c, prev in zip(s.input_ids[1:], s.components[1:], s.input_ids) if prev == tok.eos_token_id]
        assert tok.decode(s.input_ids).count("<|im_end|>\n") == len(after_end) == 5
        assert not {R, C, O} & set(after_end), "the newline after each end token is context"


# a generation prompt that pre-fills <think>, as QwQ's and DeepSeek-R1's templates write it, and turns that show
# <think> only with reasoning (DROPS_THINK: never, as QwQ's drop it)
PREFILLED_THINK_TEMPLATE = CHATML_TEMPLATE.replace(
    "<|im_start|>assistant\n{% endif %}", "<|im_start|>assistant\n<think>\n{% endif %}").replace(
    "<think>{{ m.reasoning_content }}</think>", "<think>\n{{ m.reasoning_content }}\n</think>\n")
DROPS_THINK_TEMPLATE = PREFILLED_THINK_TEMPLATE.replace("{% if m.reasoning_content %}", "{% if false %}")


def test_probe_refuses_turns_that_do_not_start_with_the_generation_prompt():
    """A rollout samples after the generation prompt and SFT labels a trace turn from where its rendering parts from
    that prompt: with a pre-filled "<think>\\n" and a turn rendered without it, the label started inside
    "<tool_call>" (its token untrained) and SFT traces no longer began with the rollouts' prompt. The probe kept such
    a template for data without reasoning (its own turn has reasoning), and for QwQ's said only that the turn shows
    no tool call in the 'hermes' format, which no rollout.tool_call_format mends."""
    tok = build_tokenizer()
    for template in (PREFILLED_THINK_TEMPLATE, DROPS_THINK_TEMPLATE):
        tok.chat_template = template
        problems = probe_chat_template(tok, "hermes", reasoning=False)
        assert len(problems) == 1 and "does not start with the generation prompt" in problems[0], problems
    tok.chat_template = PREFILLED_THINK_TEMPLATE.replace("<think>\n{% endif %}", "{% endif %}")
    assert probe_chat_template(tok, "hermes", reasoning=False) == []
    # pre-filled only after a tool turn: the probe looked at the first turn's generation prompt alone
    tok.chat_template = CHATML_TEMPLATE.replace(
        "<|im_start|>assistant\n{% endif %}",
        "<|im_start|>assistant\n{% if messages[-1].role == 'tool' %}<think>\n{% endif %}{% endif %}")
    problems = probe_chat_template(tok, "hermes", reasoning=False)
    assert len(problems) == 1 and "does not start with the generation prompt" in problems[0], problems


def test_the_built_in_format_starts_with_the_bos_token_a_model_expects(smollm2_dir):
    """The built-in format wrote no begin-of-sequence token and text is encoded without special tokens: Llama 3,
    Mistral and Gemma models (whose templates carry no tools, so they get the built-in format) trained and sampled
    without the token every input of theirs began with (Gemma's outputs degrade to noise without it)."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    from pact_fast.chat import expected_bos, resolve_chat_template
    from pact_fast.task_inputs import group_inputs

    ex = parse_example(EXAMPLE)

    def smollm2(bos="<|endoftext|>"):  # its own bos is the turn start, which every turn writes anyway
        tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
        tok.bos_token = bos
        return tok

    plain = smollm2()
    adds = smollm2()  # a tokenizer that puts its bos first when it encodes, as Llama's and Mistral's do
    adds._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{adds.bos_token} $A", special_tokens=[(adds.bos_token, adds.bos_token_id)])
    writes = smollm2()  # a template that writes it (Gemma's, Llama 3's)
    writes.chat_template = "{{ bos_token }}" + NO_CALLS_TEMPLATE
    for tok, first in ((plain, False), (adds, True), (writes, True)):
        assert (expected_bos(tok) == tok.bos_token) is first
        assert resolve_chat_template(tok, "auto", "hermes", log=None) == "builtin"
        inputs = group_inputs(tok, ex)
        starts = [inputs.po_prompt[0], inputs.tc_prompt[0]] + [s.input_ids[0] for s in inputs.sft]
        assert all((t == tok.bos_token_id) is first for t in starts), (first, starts)
        assert probe_chat_template(tok, "hermes") == []
    gpt2_like = smollm2(bos="<|im_end|>")  # one token both begins and ends (GPT-2's): never written first
    gpt2_like.chat_template = "{{ bos_token }}" + NO_CALLS_TEMPLATE
    turn_start = smollm2(bos="<|im_start|>")  # SmolLM2's own: the turn start that begins every rendering anyway
    turn_start.chat_template = "{{ bos_token }}" + NO_CALLS_TEMPLATE
    assert expected_bos(gpt2_like) == expected_bos(turn_start) == ""
    resolve_chat_template(turn_start, "auto", "hermes", log=None)
    assert group_inputs(turn_start, ex).po_prompt[:2] != [turn_start.bos_token_id] * 2, "written once, not twice"


def test_probe_names_a_template_that_drops_the_text_of_a_turn_that_calls_tools():
    """Hermes 3's template drops the text of a turn that also calls tools; the probe's call turn had no text, so a
    template doing that was kept and SFT silently lost the expert's words before its calls (kept where the data
    has none)."""
    tok = build_tokenizer()
    tok.chat_template = CHAT_TEMPLATE.replace("{%- if m.content %} {{ m.content }}{% endif -%}",
                                              "{%- if m.content and not m.tool_calls %} {{ m.content }}{% endif -%}")
    assert probe_chat_template(tok, "compact") == ["an assistant turn that calls tools drops its text (content)"]
    assert probe_chat_template(tok, "compact", call_text=False) == []
    assert resolve_chat_template(tok, "auto", "compact", call_text=False, log=None) == "model"
    assert resolve_chat_template(tok, "auto", "compact", call_text=True, log=None) == "builtin"
