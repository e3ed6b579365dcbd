"""Tool-use data: the JSONL format pact_fast trains on, and a loader that validates every row.

One JSON object per line, OpenAI chat style::

    {"id": "task-1",
     "messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."}],
     "tools": [{"type": "function", "function": {"name": "lookup", "description": "...",
                "parameters": {"type": "object", "properties": {...}, "required": [...]}}}],
     "trace": [{"role": "assistant", "reasoning_content": "...", "content": "",
                "tool_calls": [{"id": "c1", "type": "function",
                                "function": {"name": "lookup", "arguments": {"entity": "maya"}}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "acme"},
               {"role": "user", "content": "a later user turn (multi-turn data such as BFCL)"},
               {"role": "assistant", "content": "acme"}],
     "answer": "acme",
     "env": {"name": "multihop", "world_seed": 0}}

``messages`` is the prompt (system and user turns; OpenAI's ``developer`` role is read as ``system``). ``trace`` is
the expert trace: assistant turns with optional ``reasoning_content`` (a ``content`` that opens with
``<think>...</think>`` is read as reasoning and answer) and ``tool_calls`` (each with an ``id``; ``arguments`` as an
object or a JSON string, ``parameters`` read as its other name, checked against the function's schema: its required
arguments given, no argument its ``properties`` do not list), the ``tool`` responses that followed, put in the order
of the calls (``tool_call_id`` names the call; ``name``, where given, its function), and, for multi-turn tasks,
later ``user`` turns. ``tools`` (a trace turn's too) and a spec's ``parameters`` may be given as JSON text, as
``datasets`` stores columns of mixed shapes. ``answer`` and ``env`` are what the reward needs; ``env.name`` is ``multihop``, ``bfcl``, or
``"package.module:ClassName"``, an environment of your own (``pact_fast.envs.plugin``).

User messages need text (a system prompt may be empty, not null). Keys of other conventions that this
format spells otherwise (``function_call``, ``reasoning``, ``thinking``: refused unless null, or, for the
reasoning, equal to ``reasoning_content``) and content given as a list of parts are refused, not dropped; so
is any key the format does not read (``ROW_KEYS``, ``MESSAGE_KEYS``, ``CALL_KEYS``, ``FUNCTION_KEYS``) that holds a
value, and a call whose ``type`` is not ``function``: fields of your own go under ``metadata``, which is never read.

A trace is a conversation: every tool call is answered exactly once, by a ``tool`` message before
the next assistant or user turn; an assistant turn without tool calls is a final answer, after
which only a ``user`` turn may come, and a later ``user`` turn comes only after one (as a rollout gets it); the
trace ends with a final answer, as an episode does. It may
carry ``tools``, function specs it makes available from then on (BFCL's ``multi_turn_miss_func``), which its text
shows (a user turn renders as its text alone). Numbers must be
finite JSON numbers (no NaN, Infinity or 1e999), keys unique within an object (an arguments string's too) and ids
unique within a file.
"""
import hashlib
import json
import math
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path


class DataFormatError(ValueError):
    """A row that does not follow the format; the message names file, line and reason."""


class DataSetupError(DataFormatError):
    """A refusal that is the same for every row (the run's set-up, e.g. an environment class that cannot be
    imported): raised whatever ``on_error`` says, since skipping would skip every row it touches."""


@dataclass
class Example:
    id: str
    messages: list  # prompt: system/user messages
    tools: list = field(default_factory=list)  # OpenAI function specs
    trace: list = field(default_factory=list)  # expert trace messages
    answer: object = None
    env: dict = field(default_factory=dict)
    path: str = field(default="", compare=False)  # the file of a row read by load_examples; "" otherwise
    line: int = field(default=0, compare=False)  # its line there (1-based)

    @property
    def source(self):
        """``file:line`` of a row read by ``load_examples``; "" for a task made in memory."""
        return f"{self.path}:{self.line}" if self.path else ""

    def where(self):
        """The row for a message: ``file:line (id 'x')``, or ``task 'x'`` for a task made in memory."""
        return f"{self.source} (id {self.id!r})" if self.source else f"task {self.id!r}"

    def to_json(self):
        return {"id": self.id, "messages": self.messages, "tools": self.tools, "trace": self.trace,
                "answer": self.answer, "env": self.env}


@dataclass
class LoadReport:
    path: str
    loaded: int = 0
    skipped: list = field(default_factory=list)  # (line, reason)

    def summary(self):
        first = " (first: line {}: {})".format(*min(self.skipped)) if self.skipped else ""
        return f"{self.path}: {self.loaded} rows loaded, {len(self.skipped)} skipped{first}"


def _fail(reason):
    raise DataFormatError(reason)


# keys other conventions give an assistant turn that this format spells otherwise; read silently they would be dropped
_OTHER_SPELLINGS = {
    "function_call": "OpenAI's legacy 'function_call': write it as 'tool_calls': [{'id': ..., 'type': 'function', "
                     "'function': {'name': ..., 'arguments': ...}}], answered by a 'tool' message with that "
                     "'tool_call_id'",
    "reasoning": "'reasoning': name it 'reasoning_content'",
    "thinking": "'thinking': name it 'reasoning_content'",
}
# tool calls written into an assistant turn's text: the call syntax of the rollout's formats (toolcalls.OPEN, CLOSE),
# Glaive's
_CALL_MARKERS = ("<tool_call>", "</tool_call>", "<functioncall>")
# the keys this format reads: of a row ("metadata": anything of your own, never read), and of a message by role
# ("tools" on a trace's later user turn); another key with a value is refused (a typo such as "answr", or
# another convention's meaning such as axolotl's "weight": 0 would otherwise be dropped without a word)
ROW_KEYS = ("id", "messages", "tools", "trace", "answer", "env", "metadata")
MESSAGE_KEYS = {"system": ("role", "content", "name"), "user": ("role", "content", "name"),
                "assistant": ("role", "content", "name", "reasoning_content", "tool_calls", *_OTHER_SPELLINGS),
                "tool": ("role", "content", "name", "tool_call_id")}
# the keys of a tool call ("index": the call's place in OpenAI's streamed deltas; "extra_content": what Gemini's
# OpenAI-compatible API adds, its thought signature: nothing a call runs with) and of its function
CALL_KEYS = ("id", "type", "function", "index", "extra_content")
FUNCTION_KEYS = ("name", "arguments", "parameters")
# values that say nothing: null and empty ones (OpenAI's "refusal": null, "annotations": []), and the "weight": 1
# OpenAI's fine-tuning format writes on every assistant turn it trains (a 0 would not train the turn: refused)
_NO_VALUE = (None, [], {})


def _check_keys(obj, known, where):
    """Refuse a key of ``obj`` outside ``known`` that holds a value (``_NO_VALUE``, or ``"weight": 1``, is none)."""
    extra = [k for k, v in obj.items() if k not in known and v not in _NO_VALUE and not (k == "weight" and v == 1)]
    if extra:
        _fail(f"{where} has {extra[0]!r}, a key this format does not read (it reads {', '.join(known)}); rename "
              "it or leave it out" + (", or keep your own fields under 'metadata'" if where == "the row" else ""))


def _check_message(msg, where, roles):
    if not isinstance(msg, dict):
        _fail(f"{where} must be an object, got {type(msg).__name__}")
    role = msg.get("role")
    if not isinstance(role, str) or role not in roles:  # (a list is no set member: it raised TypeError)
        _fail(f"{where}.role is {role!r}; expected one of {sorted(roles)}" + (
            ": 'messages' is the prompt, the expert's turns go in 'trace' (OpenAI's fine-tuning rows keep both in "
            "'messages': split them before the first assistant turn)" if role in ("assistant", "tool")
            and where.startswith("messages") else ""))
    later_user = role == "user" and where.startswith("trace")
    _check_keys(msg, MESSAGE_KEYS[role] + (("tools",) if later_user else ()), where)
    content = msg.get("content")
    if isinstance(content, list):
        _fail(f"{where}.content is a list of content parts; give it as one string (join the parts' 'text')")
    if content is not None and not isinstance(content, str):
        _fail(f"{where}.content of a tool response must be a string (JSON-encode a structured result)"
              if role == "tool" else f"{where}.content must be a string or null")
    if (role == "user" and not (content or "").strip()) or (role == "system" and content is None):
        _fail(f"{where}.content is {'null' if content is None else 'empty'}: a {role} message needs its text"
              + (" (an empty string is an empty system prompt)" if role == "system" else ""))
    if role == "assistant":
        for key, how in _OTHER_SPELLINGS.items():
            value = msg.get(key)
            # null (the OpenAI SDK writes "function_call": null on every message), or the reasoning repeated
            if value is not None and not (key != "function_call" and value == msg.get("reasoning_content")):
                _fail(f"{where} has {how}")
    return role


def _split_think(msg, where):
    """An assistant turn whose ``content`` opens with ``<think>...</think>`` (how many chat data sets store reasoning;
    or with text up to a lone ``</think>``, where the template pre-fills ``<think>``) -> the reasoning in
    ``reasoning_content``, the rest in ``content``; a ``<think>`` tag anywhere else is refused
    (it would train as answer text and be left out of the privileged trace)."""
    content = msg.get("content") or ""
    if "<think>" not in content and "</think>" not in content:
        return msg
    head, sep, rest = content.lstrip().partition("</think>")
    opened = head.startswith("<think>")  # or not: templates that pre-fill <think> leave only its close in the text
    reasoning = head[len("<think>"):] if opened else head
    if not sep or "<think>" in reasoning or "<think>" in rest or "</think>" in rest or msg.get("reasoning_content"):
        _fail(f"{where}.content holds <think> tags other than one leading <think>...</think> block (read as "
              "reasoning_content) with no reasoning_content beside it")
    return {**msg, "reasoning_content": reasoning.strip(), "content": rest.strip()}


def _normalise_call(call, where):
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        _fail(f"{where} must be an object with a 'function' object")
    fn = call["function"]
    _check_keys(call, CALL_KEYS, where)
    _check_keys(fn, FUNCTION_KEYS, f"{where}.function")
    if call.get("type", "function") not in ("function", None):  # it would run as a function all the same
        _fail(f"{where}.type is {call['type']!r}; the calls this format runs are functions ('type': 'function')")
    if not isinstance(fn.get("name"), str) or not fn["name"]:
        _fail(f"{where}.function.name must be a non-empty string")
    # "parameters": Llama 3.1's name for them; null: the other name's column in datasets' JSONL
    given = [fn[k] for k in ("arguments", "parameters") if fn.get(k) is not None]
    if len(given) == 2:
        _fail(f"{where}.function has both 'arguments' and 'parameters'")
    args = given[0] if given else {}
    if isinstance(args, str):
        args = _json_text(args, f"{where}.function.arguments") if args.strip() else {}
    if not isinstance(args, dict):
        _fail(f"{where}.function.arguments must be an object")
    if "id" not in call or not isinstance(call["id"], str) or not call["id"]:
        _fail(f"{where} needs an 'id' (a non-empty string): the 'tool' message that answers it names it in "
              "'tool_call_id'")
    return {"id": call["id"], "type": "function", "function": {"name": fn["name"], "arguments": args}}


def _check_arguments(call, specs, where):
    """The call's arguments against its function's JSON schema: every ``required`` one given and, where the schema
    lists ``properties`` (a function of no parameters lists none), none it does not list, unless
    ``additionalProperties`` (true, or a schema) or ``patternProperties`` allow others: a stricter reading than
    JSON Schema's, whose default allows any, because an argument the function does not take fails its call."""
    params = specs[call["function"]["name"]]["parameters"]
    args = call["function"]["arguments"]
    missing = [p for p in params.get("required", []) if p not in args]
    if missing:
        _fail(f"{where} calls {call['function']['name']!r} without its required argument(s) {missing}")
    properties = params.get("properties")
    open_ended = params.get("additionalProperties", False) is not False or "patternProperties" in params
    if properties is not None and not open_ended:
        unknown = [a for a in args if a not in properties]
        if unknown:
            _fail(f"{where} calls {call['function']['name']!r} with argument(s) {unknown} that its parameters do "
                  f"not list ({sorted(properties) or 'none'}; additionalProperties would allow them)")


def _json_text(text, where):
    """``text``, a field written as JSON text (``datasets`` stores a column of mixed shapes so: xLAM's ``tools``, a
    call's ``arguments``), decoded as strictly as a row (``_strict_json``); a refusal names the field ``where``."""
    try:
        return _strict_json(text)
    except json.JSONDecodeError as exc:
        _fail(f"{where} is not valid JSON ({exc.msg})")
    except DataFormatError as exc:
        _fail(f"{where}: {exc}")


def _check_tools(tools, where):
    """Validate a list of function specs (or its JSON text), decoding a spec's ``parameters`` given as JSON text in
    place; returns (the list, {name: function spec})."""
    if isinstance(tools, str):  # "" as a call's arguments "" is {}: none
        tools = _json_text(tools, where) if tools.strip() else []
    from .envs.base import MAX_NAME_CHARS

    if not isinstance(tools, list):
        _fail(f"{where} must be a list")
    names = {}
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            _fail(f"{where}[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}")
        if len(fn["name"]) > MAX_NAME_CHARS:  # every episode's call of it would fail, a trace's call teach it anyway
            _fail(f"{where}[{i}].function.name has {len(fn['name'])} characters: a rollout runs no call of a name "
                  f"longer than {MAX_NAME_CHARS} (pact_fast.envs.base.ToolEnv)")
        if t.get("type", "function") != "function":  # rendered and run as a function all the same
            _fail(f"{where}[{i}].type is {t['type']!r}; the tools this format runs are functions ('type': 'function')")
        if fn.get("input_schema") is not None:  # read as a function of no arguments, the schema shown beside it
            _fail(f"{where}[{i}].function has 'input_schema' (Anthropic's name for its arguments' schema): name it "
                  "'parameters'")
        if fn.get("parameters") is None:  # a function of no arguments (null: another row's column, datasets' JSONL)
            fn["parameters"] = {"type": "object", "properties": {}}
        params = fn["parameters"]
        if isinstance(params, str):
            params = fn["parameters"] = _json_text(params, f"{where}[{i}].function.parameters") if params.strip() \
                else {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            _fail(f"{where}[{i}].function.parameters must be a JSON schema object")
        if params and "type" not in params and "properties" not in params:  # read as a schema, it checks nothing
            _fail(f"{where}[{i}].function.parameters must be a JSON schema ({{'type': 'object', 'properties': "
                  f"{{...}}}}); it has neither 'type' nor 'properties' but {sorted(params)[:5]} (a flat map of "
                  "arguments, as xLAM writes them? put it under 'properties')")
        if not isinstance(params.get("type", ""), (str, list)):  # the same flat map, with an argument named "type"
            _fail(f"{where}[{i}].function.parameters.type is {type(params['type']).__name__}, not a JSON schema type "
                  "(a string, or a list of them): a flat map of arguments, as xLAM writes them, with one named "
                  "'type'? put them under 'properties'")
        if not isinstance(params.get("properties", {}), dict):
            _fail(f"{where}[{i}].function.parameters.properties must be an object")
        required = params.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            _fail(f"{where}[{i}].function.parameters.required must be a list of strings")
        if fn["name"] in names:  # calls would be checked against the last spec, the prompt would show both
            first = next(j for j, u in enumerate(tools) if u.get("function", {}).get("name") == fn["name"])
            _fail(f"{where}[{i}] is a second function named {fn['name']!r} (the first is {where}[{first}]); one "
                  "spec per name")
        names[fn["name"]] = fn
    return tools, names


def parse_example(row):
    """Validate one decoded row and return an ``Example`` (tool-call arguments normalised to objects)."""
    if not isinstance(row, dict):
        _fail(f"a row must be a JSON object, got {type(row).__name__}"
              + (" (a JSON array file? rows are JSONL, one object per line)" if isinstance(row, list) else ""))
    if "id" not in row:
        _fail("missing 'id' (a string or an integer)")
    _check_keys(row, ROW_KEYS, "the row")
    if not isinstance(row["id"], (str, int)) or isinstance(row["id"], bool) or not str(row["id"]).strip():
        _fail(f"'id' must be a non-empty string or an integer, got {json.dumps(row['id'])}")
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        _fail("'messages' must be a non-empty list")
    # OpenAI's name for the system message of its reasoning models
    messages = [{**m, "role": "system"} if isinstance(m, dict) and m.get("role") == "developer" else m
                for m in messages]
    for i, m in enumerate(messages):
        _check_message(m, f"messages[{i}]", {"system", "user"})
    roles = [m["role"] for m in messages]
    if "user" not in roles:
        _fail("'messages' has no user message")
    if "system" in roles[roles.index("user"):]:  # the built-in tool formats gather every system text in the first turn
        _fail(f"messages[{roles.index('system', roles.index('user'))}] is a system message after a user message; the "
              "prompt's system messages come first (the built-in tool format would move it before the user's text)")
    tools = [] if row.get("tools") is None else row["tools"]  # null: a column another row fills (datasets' JSONL)
    tools, names = _check_tools(tools, "tools")
    trace = [] if row.get("trace") is None else row["trace"]
    if not isinstance(trace, list):
        _fail("'trace' must be a list")
    norm_trace = []
    open_calls = {}  # id -> where, of calls not answered yet
    called = {}  # call id -> the function it calls
    final_answer = None  # index of the assistant turn that ended the conversation so far

    def require_answered(i):
        if open_calls:
            cid, where = next(iter(open_calls.items()))
            _fail(f"{where} (id {cid!r}) is never answered: trace[{i}] comes before its tool response"
                  if i is not None else f"{where} (id {cid!r}) is never answered")

    for i, m in enumerate(trace):
        role = _check_message(m, f"trace[{i}]", {"assistant", "tool", "user"})
        m = dict(m)
        if role == "assistant":
            for key in _OTHER_SPELLINGS:  # null or a copy of reasoning_content (checked above): nothing of its own
                m.pop(key, None)
            m = _split_think(m, f"trace[{i}]")
            if final_answer is not None:
                _fail(f"trace[{i}] is an assistant turn after the final answer trace[{final_answer}]; "
                      f"only a user turn may follow it")
            require_answered(i)
            reasoning = m.get("reasoning_content")
            if reasoning is not None and not isinstance(reasoning, str):
                _fail(f"trace[{i}].reasoning_content must be a string")
            if reasoning and ("<think>" in reasoning or "</think>" in reasoning):
                _fail(f"trace[{i}].reasoning_content holds a <think> or </think> tag: rendered in the turn's <think> "
                      "block it would end (or open) the reasoning there; give the reasoning without the tags")
            marker = next((t for t in _CALL_MARKERS if t in (m.get("content") or "")), None)
            if marker:
                _fail(f"trace[{i}].content holds {marker!r}, a tool call written as text (Hermes', Glaive's data): the "
                      "rollout would read such text as a call, the trace as answer text; give the call in "
                      "'tool_calls', answered by a 'tool' message")
            calls = [] if m.get("tool_calls") is None else m["tool_calls"]
            if not isinstance(calls, list):  # ({} and "" read as "no calls" put the error on the tool turn after)
                _fail(f"trace[{i}].tool_calls must be a list, got {json.dumps(calls)[:60]}")
            m["tool_calls"] = [_normalise_call(c, f"trace[{i}].tool_calls[{j}]") for j, c in enumerate(calls)]
            for j, c in enumerate(m["tool_calls"]):
                if tools and c["function"]["name"] not in names:
                    _fail(f"trace[{i}] calls {c['function']['name']!r}, which 'tools' does not list")
                if tools:
                    _check_arguments(c, names, f"trace[{i}].tool_calls[{j}]")
                if c["id"] in called:
                    _fail(f"trace[{i}].tool_calls[{j}].id {c['id']!r} is used by an earlier tool call")
                called[c["id"]] = c["function"]["name"]
                open_calls[c["id"]] = f"trace[{i}].tool_calls[{j}]"
            if not m["tool_calls"]:
                m.pop("tool_calls")
                final_answer = i
        elif role == "tool":
            cid = m.get("tool_call_id")
            if cid is None:
                _fail(f"trace[{i}] (a tool response) has no 'tool_call_id': it names the id of the call it answers")
            if not isinstance(cid, str):  # call ids are strings (a list here stopped the load with a TypeError)
                _fail(f"trace[{i}].tool_call_id must be a string, the 'id' of the call it answers; got "
                      f"{json.dumps(cid)[:60]}")
            if cid in called and cid not in open_calls:
                _fail(f"trace[{i}].tool_call_id {cid!r} answers a tool call a second time")
            if cid not in open_calls:
                _fail(f"trace[{i}].tool_call_id {cid!r} answers no earlier tool call")
            del open_calls[cid]
            if m.get("name") not in (None, called[cid]):  # the data's own pairing says another call: ids mixed up
                _fail(f"trace[{i}] is named {m['name']!r} but answers call {cid!r}, of {called[cid]!r}; a tool "
                      "response's 'name' is the function of the call its 'tool_call_id' names")
            if not isinstance(m.get("content"), str):
                _fail(f"trace[{i}].content of a tool response must be a string (JSON-encode a structured result)")
        else:
            require_answered(i)
            if final_answer is None:  # a rollout gets the next user turn once the assistant answers, never before
                _fail(f"trace[{i}] is a user turn that follows no final answer: a later user turn comes after an "
                      "assistant turn without tool calls" + (" (the prompt's user turns go in 'messages')" if not i else
                                                             ""))
            final_answer = None
            if m.get("tools") is not None:  # null: a column of another row's message (datasets' JSONL)
                m["tools"], added = _check_tools(m["tools"], f"trace[{i}].tools")
                again = sorted(set(added) & set(names))
                if again:  # the prompt would show both specs, the calls be checked against the later one
                    _fail(f"trace[{i}].tools specifies {again[0]!r} again; a tool is specified once (in 'tools' "
                          "or the user turn that makes it available)")
                unseen = [name for name in added if name not in m["content"]]
                if unseen:  # no template renders a message's tools, no environment hands a rollout more than text
                    _fail(f"trace[{i}].tools specifies {unseen[0]!r}, which the turn's text does not show: a user turn "
                          "is rendered (and handed to a rollout) as its text alone, so the model would never see the "
                          "spec; write it into the text, as pact_fast.envs.bfcl.load_bfcl does")
                names.update(added)
        norm_trace.append(m)
    require_answered(None)
    if trace and final_answer is None:  # an episode ends at a final answer (the reward reads it): so does a trace
        last = trace[-1]["role"]
        _fail(f"the trace ends on trace[{len(trace) - 1}], a {'tool response' if last == 'tool' else last + ' turn'}: "
              "it ends with the expert's final answer, an assistant turn without tool calls (an episode ends "
              "there, and the trained answer would be missing)")
    norm_trace = _responses_in_call_order(norm_trace)
    env = {} if row.get("env") is None else row["env"]
    if not isinstance(env, dict):
        _fail("'env' must be an object")
    return Example(str(row["id"]), messages, tools, norm_trace, row.get("answer"), env)


def _responses_in_call_order(trace):
    """``trace`` with each turn's tool responses in the order of its calls: a rollout gets a turn's results in
    call order, and templates show no ids, so a response in another order would read as another call's result.
    (Every call is answered before the next turn, so a run of tool messages answers one turn's calls.)"""
    order = {c["id"]: k for m in trace for k, c in enumerate(m.get("tool_calls") or [])}
    out, run = [], []
    for m in trace + [None]:
        if m is not None and m["role"] == "tool":
            run.append(m)
            continue
        out += sorted(run, key=lambda r: order[r["tool_call_id"]])
        run = []
        if m is not None:
            out.append(m)
    return out


ENVIRONMENTS = ("multihop", "bfcl")  # the env names pact_fast.envs.make_env_factory runs


def check_trainable(example, *, needs_trace=True, env_modules=()):
    """Refuse a row that parses but cannot train: it would run at zero loss and zero reward.

    Every row needs ``tools`` (what the policy may call), ``env`` with a ``name`` (what runs the calls and
    scores the episode: ``ENVIRONMENTS``, or ``"package.module:Class"``, ``envs.plugin``), and, for the
    multi-hop environment, ``answer`` (its reward). ``needs_trace`` (every loss mode but ``grpo``): a ``trace``
    with at least one assistant turn. Then its environment's own check (``envs.check_example``: a multi-hop
    trace must replay to reward 1 there; a BFCL row needs the fields its back-ends read, and its trace must replay
    to reward 1 on them; an environment of the user's own must come from ``env_modules``, ``data.env_modules``, or
    it is a ``DataSetupError``). Raises ``DataFormatError``.
    """
    if not example.tools:
        _fail("missing 'tools': a row lists the functions the policy may call")
    if not example.env or not isinstance(example.env.get("name"), str):
        _fail("missing 'env' (an object with a 'name', e.g. {\"name\": \"multihop\", \"world_seed\": 0}): "
              "the environment that runs the calls and scores the episode")
    from .envs import check_example, plugin

    if example.env["name"] not in ENVIRONMENTS and not plugin.is_plugin(example.env["name"]):
        _fail(f"unknown env name {example.env['name']!r}; known: {', '.join(ENVIRONMENTS)}, or 'package.module:Class' "
              "naming a ToolEnv subclass of your own (pact_fast.envs.plugin)")
    seed = example.env.get("world_seed", 0)
    if example.env["name"] == "multihop" and (not isinstance(seed, int) or isinstance(seed, bool)):
        _fail(f"env 'world_seed' must be an integer, got {seed!r}")
    if example.env["name"] == "multihop" and example.answer is None:
        _fail("missing 'answer': the multihop environment's reward compares the final answer with it")
    if example.env["name"] == "multihop" and not str(example.answer).strip():
        _fail("'answer' is empty: the multihop reward would pay an empty reply")
    if needs_trace and not any(m["role"] == "assistant" for m in example.trace):
        _fail("missing 'trace' (the expert's assistant turns): every loss mode but grpo trains on it")
    reason = check_example(example, env_modules)
    if reason:
        _fail(reason)


def _reject_constant(name):
    _fail(f"{name} is not a JSON number (numbers must be finite)")


def _finite_float(text):
    """A JSON number's ``text`` -> float; one past a double's range (``1e999``, which Python reads as inf) is a
    ``DataFormatError``, as ``Infinity`` is."""
    value = float(text)
    if not math.isfinite(value):
        _fail(f"{text if len(text) <= 24 else text[:20] + '...'} is past a float's range (numbers must be finite)")
    return value


def _unique_keys(pairs):
    """A JSON object's (key, value) pairs -> a dict; a key given twice is a ``DataFormatError`` (``json`` keeps the last
    value without a word, other readers the first)."""
    obj = dict(pairs)
    if len(obj) < len(pairs):
        seen = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        _fail(f"an object gives the key {key!r} twice; which value is meant is not said (Python's json reads the last, "
              "other readers the first)")
    return obj


# how files that are not JSONL text start: compressed files, archives, and Hugging Face data sets' Parquet
_BINARY_STARTS = {b"\x1f\x8b": "a gzip file: decompress it first", b"BZh": "a bzip2 file: decompress it first",
                  b"\xfd7zXZ\x00": "an xz file: decompress it first",
                  b"\x28\xb5\x2f\xfd": "a zstd file: decompress it first",
                  b"PK\x03\x04": "a zip archive: extract the data file from it",
                  b"PAR1": "a Parquet file: convert it (datasets.Dataset.from_parquet(path).to_json('rows.jsonl'))"}


def _decode_row(raw, line_no=0):
    """One line of bytes (the ``line_no``-th) -> the decoded JSON value; every failure is a ``DataFormatError``."""
    if line_no == 1:
        what = next((what for start, what in _BINARY_STARTS.items() if raw.startswith(start)), None)
        if what:
            _fail(f"{what} (rows are JSONL text, one JSON object per line)")
        if raw.strip() in (b"[", b"{"):
            _fail(f"the line is {raw.strip().decode()!r} alone: a JSON array or pretty-printed JSON, not JSONL (one "
                  "JSON object per line)")
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        _fail(f"not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})")
    try:
        return _strict_json(line)
    except json.JSONDecodeError as exc:
        text = line.rstrip("\r\n")
        where = f"{exc.msg.removesuffix(' at')} at column {exc.colno}"  # some messages end in "at" already
        if line_no == 1 and text.lstrip().startswith("["):  # `[{...},` over several lines, or cut short
            _fail("invalid JSON: the file opens a JSON array, not JSONL (one JSON object per line)")
        if exc.msg == "Extra data" and "\r" in text[exc.pos - 1:exc.pos + 1]:
            _fail(f"invalid JSON ({where}): rows separated by a bare carriage return (old Mac line ends); JSONL "
                  "separates them by newlines")
        if exc.pos >= len(text):  # the text ends before the value does: a truncated row
            _fail(f"invalid JSON: the line ends after column {len(text)} ({where}; truncated?)")
        _fail(f"invalid JSON ({where})")


def _strict_json(text):
    """``text`` -> its JSON value, decoded strictly: NaN or Infinity (or 1e999, past a float's range), a key given
    twice, a lone surrogate escape, nesting past Python's recursion limit and a number past its int conversion limit
    are each a ``DataFormatError``; a syntax error is raised as ``json.JSONDecodeError`` for the caller to explain (a
    row's names its column)."""
    try:
        value = json.loads(text, parse_float=_finite_float, parse_constant=_reject_constant,
                           object_pairs_hook=_unique_keys)
        json.dumps(value, ensure_ascii=False).encode("utf-8")  # a lone \ud800-\udfff escape: no character
        return value
    except (json.JSONDecodeError, DataFormatError):  # (both ValueErrors: before the last clause)
        raise
    except UnicodeEncodeError:
        _fail("a string holds a lone surrogate escape (\\ud800-\\udfff): it encodes no character")
    except RecursionError:
        _fail("JSON nested too deeply")
    except ValueError:  # Python's int-string conversion limit
        _fail("a number has more digits than Python's int conversion limit (4300 by default)")


def load_examples(path, *, on_error="raise", check=None):
    """Read a JSONL file of examples.

    on_error: ``"raise"`` stops at the first bad row with a ``DataFormatError`` naming file, line and
    reason; ``"skip"`` skips bad rows and records each (line, reason) in the report.
    check: an optional ``Example -> None`` that raises ``DataFormatError`` for a row the caller cannot use
    (e.g. ``check_trainable``); its refusals are reported like format errors, with file and line.
    Returns ``(examples, LoadReport)``.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"load_examples: on_error={on_error!r}; choose 'raise' or 'skip'")
    path = Path(path)
    report, examples = LoadReport(str(path)), []
    first_line = {}  # id -> line where it first appeared
    try:
        f = path.open("rb")
    except OSError as exc:  # a file of another user's, say: one line, not a PermissionError traceback
        raise DataFormatError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    with f:
        for line_no, raw in enumerate(f, start=1):
            if line_no == 1:  # a UTF-8 byte order mark, on a line of its own too (then a blank line, skipped)
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            try:
                example = parse_example(_decode_row(raw, line_no)) if raw.strip() else None
                if example is not None and example.id in first_line:
                    _fail(f"duplicate id {example.id!r} (first on line {first_line[example.id]})")
                if example is not None and check is not None:
                    check(example)
            except DataFormatError as exc:
                if on_error == "raise" or isinstance(exc, DataSetupError):
                    raise type(exc)(f"{path}:{line_no}: {exc}") from None
                report.skipped.append((line_no, str(exc)))
                continue
            if example is not None:
                first_line[example.id] = line_no
                example.path, example.line = str(path), line_no
                examples.append(example)
    report.loaded = len(examples)
    if not examples:
        raise DataFormatError(f"{path}: no valid rows" + (f" ({len(report.skipped)} skipped; first: line "
                                                          f"{report.skipped[0][0]}: {report.skipped[0][1]})"
                                                          if report.skipped else ""))
    return examples, report


def ids_fingerprint(examples):
    """A short hash of the examples' ids in order: what a run's data order draws from, or what it held out."""
    return hashlib.sha256("\n".join(ex.id for ex in examples).encode()).hexdigest()[:16]


def write_examples(path, examples):
    """Write ``Example`` objects (or row dicts) as JSONL that ``load_examples`` reads back unchanged."""
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex.to_json() if isinstance(ex, Example) else ex, allow_nan=False) + "\n")


def keep_rows(examples, check, on_error, skipped, progress=None):
    """The ``examples`` that ``check(example)`` passes. A ``DataFormatError`` it raises is raised again naming the row
    (``Example.where``, unless its message already starts with it) with ``on_error="raise"``; with ``"skip"`` the
    row is left out and ``skipped(example, str(error))`` called. ``progress(done)``, when given, after each row."""
    kept = []
    for done, example in enumerate(examples, start=1):
        try:
            check(example)
            kept.append(example)
        except DataFormatError as exc:
            if on_error == "skip" and not isinstance(exc, DataSetupError):
                skipped(example, str(exc))
            elif str(exc).startswith(example.where()):
                raise
            else:
                raise type(exc)(f"{example.where()}: {exc}") from None
        if progress is not None:
            progress(done)
    return kept


def _with_traces(examples, report, on_error, env_modules):
    """``examples`` that carry a trace (``check_trainable``'s trace check); one without is a ``DataFormatError``
    naming its file and line, or (``on_error="skip"``) left out and recorded in ``report``."""
    def skipped(example, reason):
        report.skipped.append((example.line, reason))
        report.loaded -= 1

    return keep_rows(examples, partial(check_trainable, needs_trace=True, env_modules=env_modules), on_error, skipped)


def _to_stderr(message):
    print(message, file=sys.stderr)


def load_data(cfg, *, needs_trace=True, log=_to_stderr):
    """(train examples, held-out examples) from a data file or the built-in environment.

    A file's rows must be trainable (``data.check_trainable``: tools, env, the answer its reward needs, and a
    trace when ``needs_trace``); held-out rows need no trace, and without ``data.eval_path`` they are split off
    before the trace check (a run and its evaluation hold out the same rows). No held-out task is a
    ``DataFormatError``. ``log``: what was skipped (``data.on_error=skip``), held-out ids that are also training rows,
    and a split smaller than ``data.eval_tasks``; default stderr (stdout is the command's JSON result, as in
    ``pact-fast train > summary.json``); None: not said."""
    log = log or (lambda message: None)
    from .envs import make_tasks

    for key, path in (("data.path", cfg.path), ("data.eval_path", cfg.eval_path)):
        if path and not Path(path).is_file():
            raise FileNotFoundError(f"{key}={path}: " + (
                "a directory; give a JSONL file" if Path(path).is_dir() else
                "not a regular file (a pipe, as --data <(zcat ...) gives, reads once; a resume and `pact-fast eval "
                "--run` read the data again); give a JSONL file" if Path(path).exists() else "no such file"))
    if cfg.path:
        # the held-out split is made before the trace check (held-out rows need none), so that a run and
        # `pact-fast eval` of it split a file alike whatever the loss mode
        check = partial(check_trainable, needs_trace=False, env_modules=cfg.env_modules)
        rows, report = load_examples(cfg.path, on_error=cfg.on_error, check=check)
        if cfg.eval_path:
            held_out, eval_report = load_examples(cfg.eval_path, on_error=cfg.on_error, check=check)
            train = rows
            if eval_report.skipped:
                log(f"[pact_fast] {eval_report.summary()}")
            overlap = sorted({ex.id for ex in held_out} & {ex.id for ex in rows})
            if overlap:
                log(f"[pact_fast] {len(overlap)} held-out ids are also training rows (first: {overlap[0]!r}): the "
                    "held-out results include tasks the run trains on")
        else:
            n = min(cfg.eval_tasks, len(rows) // 5)
            train, held_out = rows[n:], rows[:n]
            if 0 < n < cfg.eval_tasks:  # (none held out is refused below)
                log(f"[pact_fast] data.eval_tasks={cfg.eval_tasks}: {n} rows of {cfg.path} held out, at most a fifth "
                    f"of its {len(rows)} (data.eval_path gives a held-out file of its own)")
        if needs_trace:
            train = _with_traces(train, report, cfg.on_error, cfg.env_modules)
            if not train:
                raise DataFormatError(f"{cfg.path}: no training row has a trace (every loss mode but grpo trains on "
                                      "one)")
        if report.skipped:
            log(f"[pact_fast] {report.summary()}")
    else:
        kw = dict(hops=cfg.hops, n_distractors=cfg.distractors, ops=cfg.ops)
        train = [parse_example(t) for t in make_tasks(cfg.train_tasks, seed=cfg.seed, world_seed=cfg.world_seed,
                                                      **kw)]
        held_out = [parse_example(t) for t in make_tasks(cfg.eval_tasks, seed=cfg.seed + 1000,
                                                         world_seed=cfg.world_seed + 1, **kw)]
    if cfg.format_reward and not any((ex.env or {}).get("name") == "multihop" for ex in train + held_out):
        raise DataFormatError(f"{cfg.path}: data.format_reward={cfg.format_reward:g} pays the multihop environment's "
                              "episodes only, and no row of this data uses it")
    from .envs import plugin

    if cfg.env_modules and not any(plugin.is_plugin((ex.env or {}).get("name")) for ex in train + held_out):
        # every row names a built-in environment: the allowed modules are never imported, the run trains as without
        raise DataFormatError(f"{cfg.path}: data.env_modules=[{', '.join(cfg.env_modules)}]: no row of this data names "
                              "an environment of your own ('package.module:ClassName'), so it would change nothing; "
                              "leave it out, or name the class in the rows' env")
    if not held_out:  # training would report a held-out success of 0.0, evaluation would have nothing to score
        raise DataFormatError(f"{cfg.path or 'the built-in environment'}: no held-out tasks (data.eval_tasks=0, or "
                              "a data file too small to split off a fifth of it; give data.eval_path)")
    return train, held_out
