"""BFCL multi-turn data and executable back-ends as pact_fast examples and an environment.

Needs the ``bfcl-eval`` package, installed without its API-client dependencies:
``pip install --no-deps bfcl-eval`` (its multi-turn back-ends need only the standard library and
mpmath). Data and function docs are read from the installed package; nothing is downloaded.

- ``load_bfcl(category)``: each entry of a multi-turn category (``CATEGORIES``) becomes an
  ``Example``: the first user turn is the prompt; the trace replays BFCL's gold call sequence, one
  assistant tool call per message with the back-end's response, an empty assistant message closing
  each user turn, and the later user turns in between; ``env`` carries the initial back-end
  configuration, the later user turns and the gold calls. Category semantics, as BFCL scores them:

  - ``multi_turn_base``: every function is offered from the start;
  - ``multi_turn_miss_func``: BFCL holds some functions back until a given turn, whose user message
    it writes itself ("I have updated some more functions ..."); ``tools`` leaves them out, that
    user turn lists their specs (in its text, and in its ``tools`` field, which the data loader
    reads), and ``BFCLEnv`` answers calls to them with an error until that turn;
  - ``multi_turn_miss_param``: some turns lack a parameter: their gold is empty, so the trace closes
    the turn without a call (the assistant has to ask) and the next user turn supplies it;
  - ``multi_turn_long_context``: the back-ends are loaded with ``long_context=True`` (BFCL's larger
    file systems, message inboxes and so on), in the environment and for the gold state alike.

- ``parse_call``: a BFCL call string (``mv(source='a', destination='b')``) parsed with ``ast``;
  arguments must be literals. Nothing is ever passed to ``eval``.
- ``BFCLBackends``: the back-end instances of an entry; calls dispatch to their public methods.
- ``BFCLEnv``: the environment interface of the rollout. The model's calls run on back-ends in a
  worker process (``pact_fast.envs.sandbox``), each under a time limit, so that no call can stall a
  run; once the assistant ends a turn, ``next_user_turn`` hands over BFCL's next user turn; the
  reward is 1 when the back-ends end in the state the gold calls produce (BFCL's state check).
"""
import ast
import collections
import copy
import importlib
import inspect
import json
from importlib import resources

from ..toolcalls import MAX_CALL_CHARS, excerpt
from .base import MAX_CALLS_PER_TURN, MAX_RESULT_CHARS, ToolEnv, unread_env_key
from .sandbox import CALL_TIMEOUT_S, Sandbox, SandboxTimeout

CATEGORIES = ("multi_turn_base", "multi_turn_miss_func", "multi_turn_miss_param", "multi_turn_long_context")
ERROR = "Error during execution: "  # how BFCL's executor words a failed call


def _package_file(*parts):
    try:
        root = resources.files("bfcl_eval")
    except ModuleNotFoundError as exc:
        raise ImportError("BFCL support needs bfcl-eval: pip install --no-deps bfcl-eval") from exc
    return root.joinpath(*parts)


def _read_jsonl(path):
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def parse_call(text, max_chars=MAX_CALL_CHARS):
    """``name(arg, key=value, ...)`` -> (name, args list, kwargs dict). Literal arguments only; raises
    ValueError for anything else (attribute calls, nested calls, names, ``**kwargs``), for a text
    longer than ``max_chars`` and for one nested too deeply for the parser. Messages quote at most a
    short excerpt of the text."""
    if not isinstance(text, str):
        raise ValueError(f"a call must be a string, got {type(text).__name__}")
    if len(text) > max_chars:
        raise ValueError(f"call of {len(text)} characters is longer than the limit of {max_chars}")
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as exc:
        reason = exc.msg if len(exc.msg) <= 60 else exc.msg[:60] + "..."
        raise ValueError(f"not a call: {excerpt(text)} ({reason})") from None
    except (RecursionError, MemoryError):
        raise ValueError(f"not a call: {excerpt(text)} (nested too deeply)") from None
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        raise ValueError(f"not a plain function call: {excerpt(text)}")
    try:
        args = [ast.literal_eval(a) for a in node.args]
        if any(k.arg is None for k in node.keywords):
            raise ValueError("**kwargs")
        kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
        raise ValueError(f"arguments of {excerpt(text)} must be literals") from None
    return node.func.id, args, kwargs


def _reports_error(result):
    """Whether a back-end's result is its own error report, ``{"error": ...}`` (how most BFCL back-ends say a
    call failed, rather than raising)."""
    if not result.startswith("{"):
        return False
    try:
        value = json.loads(result)
    except ValueError:
        return False
    return isinstance(value, dict) and "error" in value


def _format_result(result):
    """The response text BFCL's executor produces for a return value."""
    if isinstance(result, str):
        return result
    if isinstance(result, dict):
        try:
            return json.dumps(result)
        except (TypeError, ValueError):
            return str(result)
    return str(result)


class BFCLBackends:
    """Fresh instances of an entry's back-end classes, loaded with its initial configuration."""

    def __init__(self, initial_config, involved_classes, long_context=False):
        from bfcl_eval.constants.executable_backend_config import CLASS_FILE_PATH_MAPPING, STATELESS_CLASSES

        self.instances, self.methods = {}, {}
        for name in involved_classes:
            instance = getattr(importlib.import_module(CLASS_FILE_PATH_MAPPING[name]), name)()
            if name not in STATELESS_CLASSES:
                instance._load_scenario(copy.deepcopy(initial_config.get(name, {})), long_context=long_context)
            self.instances[name] = instance
            for method_name, method in inspect.getmembers(instance, predicate=inspect.ismethod):
                if not method_name.startswith("_"):
                    self.methods[method_name] = method

    def execute(self, name, args=(), kwargs=None):
        """Run one call; errors become BFCL-style error texts, never exceptions. The arguments are
        copied: back-ends keep references to what they are given (a tweet's ``mentions`` list), and a
        caller that reuses its dicts would otherwise see them change."""
        method = self.methods.get(name)
        if method is None:
            return f"{ERROR}unknown function {name}"
        try:
            return _format_result(method(*copy.deepcopy(list(args)), **copy.deepcopy(kwargs or {})))
        except Exception as exc:  # a back-end error is an observation for the model
            return f"{ERROR}{exc}"

    def execute_string(self, text):
        try:
            name, args, kwargs = parse_call(text)
        except ValueError as exc:
            return f"{ERROR}{exc}"
        return self.execute(name, args, kwargs)

    def snapshot(self):
        """The back-end instances (what BFCL's ``state_checker`` compares)."""
        return self.instances


def _tool_spec(doc):
    params = dict(doc.get("parameters", {}))
    params["type"] = "object"  # BFCL writes "dict"
    return {"type": "function", "function": {"name": doc["name"], "description": doc.get("description", ""),
                                             "parameters": params}}


def _func_docs(involved_classes):
    from bfcl_eval.constants.executable_backend_config import MULTI_TURN_FUNC_DOC_FILE_MAPPING

    docs = []
    for name in involved_classes:
        docs += _read_jsonl(_package_file("data", "multi_turn_func_doc", MULTI_TURN_FUNC_DOC_FILE_MAPPING[name]))
    return docs


def revealed_turn_text(specs):
    """The user message of a turn where BFCL reveals held-back functions: their specs, then BFCL's words."""
    from bfcl_eval.constants.default_prompts import DEFAULT_USER_PROMPT_FOR_ADDITIONAL_FUNCTION_FC

    return json.dumps(specs) + "\n" + DEFAULT_USER_PROMPT_FOR_ADDITIONAL_FUNCTION_FC


def _entry_example(entry, gold, category):
    """One BFCL entry and its gold call lists (one per turn) -> a data row (see the module docstring)."""
    classes = entry["involved_classes"]
    long_context = category == "multi_turn_long_context"
    specs = {d["name"]: _tool_spec(d) for d in _func_docs(classes)}
    held = {int(turn): list(names) for turn, names in entry.get("missed_function", {}).items()}
    unknown = [n for names in held.values() for n in names if n not in specs]
    if unknown:
        raise ValueError(f"missed_function names {unknown} are not functions of {classes}")
    held_names = {n for names in held.values() for n in names}
    if len(gold) != len(entry["question"]):
        raise ValueError(f"{len(entry['question'])} user turns but {len(gold)} gold turns")
    backends = BFCLBackends(entry["initial_config"], classes, long_context=long_context)
    trace, user_turns, n_call = [], [], 0
    for turn, (question, calls) in enumerate(zip(entry["question"], gold)):
        if turn in held:
            if question:
                raise ValueError(f"turn {turn} reveals functions but has its own user message")
            revealed = [specs[n] for n in held[turn]]
            question = [{"role": "user", "content": revealed_turn_text(revealed)}]
        if turn:
            user_turns.append([{"role": "user", "content": m["content"]} for m in question])
            message = {"role": "user", "content": "\n".join(m["content"] for m in question)}
            if turn in held:
                message["tools"] = revealed
            trace.append(message)
        for call in calls:
            name, args, kwargs = parse_call(call)
            if name not in backends.methods:
                raise ValueError(f"gold call {excerpt(call)} names no function of {classes}")
            later = [t for t, names in held.items() if name in names and t > turn]
            if later:
                raise ValueError(f"gold turn {turn} calls {name!r}, which BFCL holds back until turn {later[0]}")
            if args:  # positional arguments become the method's parameter names
                params = list(inspect.signature(backends.methods[name]).parameters)
                kwargs = {**dict(zip(params, args)), **kwargs}
            n_call += 1
            cid = f"call{n_call}"
            trace.append({"role": "assistant", "content": "", "tool_calls": [
                {"id": cid, "type": "function", "function": {"name": name, "arguments": copy.deepcopy(kwargs)}}]})
            trace.append({"role": "tool", "tool_call_id": cid, "content": backends.execute(name, (), kwargs)})
        trace.append({"role": "assistant", "content": ""})
    return {
        "id": entry["id"], "messages": entry["question"][0],
        "tools": [spec for name, spec in specs.items() if name not in held_names],
        "trace": trace, "answer": None,
        "env": {"name": "bfcl", "category": category, "initial_config": entry["initial_config"],
                "involved_classes": classes, "long_context": long_context, "user_turns": user_turns,
                "revealed_tools": {str(turn): names for turn, names in held.items()}, "gold": gold}}


# what load_bfcl writes in a row's env: BFCLEnv reads all but ``category`` (the BFCL category it came from)
ENV_KEYS = ("name", "category", "initial_config", "involved_classes", "long_context", "user_turns", "revealed_tools",
            "gold")


def _turn_text(messages):
    """A later user turn's text, as an episode gets it: its messages' contents, one per line."""
    return "\n".join(m["content"] for m in messages)


def check_example(example):
    """Why ``example`` cannot run in ``BFCLEnv`` (a one-line reason), or None: ``env`` needs
    ``involved_classes`` (BFCL back-end class names), ``initial_config`` (an object), ``user_turns`` (a list of
    message lists, one per later user turn of the trace) and ``gold`` (a list of call-string lists, one per user
    turn), as ``load_bfcl`` writes them; a row without them ran until its first episode reached the missing field.
    ``long_context`` must be a bool, ``revealed_tools`` map later user turns to function names (a turn outside
    them never reveals), each gold call be a call of a function of the classes (``parse_call``) and the back-ends
    load ``initial_config``. A key outside ``ENV_KEYS`` (a typo of ``long_context``) would be ignored: refused. A
    later user turn must not be blank, and a trace must replay to reward 1 (``_replay_mismatch``). Without
    bfcl-eval installed, a ``DataSetupError`` (refused whatever ``data.on_error`` says)."""
    from ..data import DataSetupError

    try:
        from bfcl_eval.constants.executable_backend_config import CLASS_FILE_PATH_MAPPING
    except ImportError:  # the same for every BFCL row: data.on_error=skip trained on without them, said in a count
        raise DataSetupError("env 'bfcl' needs the bfcl-eval package: pip install --no-deps bfcl-eval") from None
    env = example.env
    unread = unread_env_key(env, "bfcl", ENV_KEYS)
    if unread:
        return unread
    classes = env.get("involved_classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        return "env 'bfcl' needs 'involved_classes', a non-empty list of BFCL back-end class names"
    unknown = [c for c in classes if c not in CLASS_FILE_PATH_MAPPING]
    if unknown:
        return (f"env 'involved_classes' names {unknown[0]!r}, not a BFCL back-end "
                f"({', '.join(CLASS_FILE_PATH_MAPPING)})")
    if not isinstance(env.get("initial_config"), dict):
        return "env 'bfcl' needs 'initial_config', an object (the back-ends' initial state)"
    turns = env.get("user_turns")
    if not isinstance(turns, list) or not all(
            isinstance(t, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in t)
            and _turn_text(t).strip() for t in turns):  # a blank turn: the rollout refuses it (None ends an episode)
        return "env 'bfcl' needs 'user_turns', a list with the messages (each with a 'content' text) of each later " \
               "user turn, none of them blank"
    later = [m["content"] for m in example.trace if m["role"] == "user"]
    if example.trace and len(later) != len(turns):
        return f"env 'user_turns' has {len(turns)} later user turns, the trace {len(later)}"
    for k, (text, turn) in enumerate(zip(later, turns) if example.trace else ()):
        if text != _turn_text(turn):  # the SFT term trained one conversation, the rollouts got another
            return (f"env 'user_turns' turn {k + 1} reads {excerpt(_turn_text(turn))}, the trace's user turn "
                    f"{excerpt(text)}: an episode gets the first")
    gold = env.get("gold")
    if not isinstance(gold, list) or not all(isinstance(t, list) and all(isinstance(c, str) for c in t) for t in gold):
        return "env 'bfcl' needs 'gold', a list with the gold call strings of each user turn"
    if len(gold) != 1 + len(turns):
        return f"env 'gold' has {len(gold)} turns for {1 + len(turns)} user turns"
    functions = {d["name"] for d in _func_docs(classes)}
    for turn, calls in enumerate(gold):
        for call in calls:
            try:
                name = parse_call(call)[0]
            except ValueError as exc:
                return f"env 'gold' turn {turn}: {exc}"
            if name not in functions:  # its result, an error text, would pay the model's call of the same name
                return f"env 'gold' turn {turn} calls {name!r}, not a function of {', '.join(classes)}"
    if not isinstance(env.get("long_context", False), bool):
        return f"env 'long_context' is {env['long_context']!r}: expected true or false (\"false\" read as true)"
    try:  # in the worker process, a back-end that cannot load answered every call "ran past the time limit"
        backends = BFCLBackends(env["initial_config"], classes, env.get("long_context", False))
    except Exception as exc:  # the back-ends' own code, on a configuration it does not expect
        return f"env 'initial_config' does not load into {', '.join(classes)}: {type(exc).__name__}: {excerpt(exc)}"
    revealed = env.get("revealed_tools", {})
    if not (isinstance(revealed, dict) and all(
            str(k).isdecimal() and 1 <= int(k) <= len(turns) and isinstance(v, list)
            and all(isinstance(n, str) for n in v) for k, v in revealed.items())):
        return (f"env 'revealed_tools' is {excerpt(revealed)}: expected an object of later user turns (\"1\" to "
                f"\"{len(turns)}\") -> the names of the functions each reveals (the functions of a turn outside "
                "them stayed unknown to every call)")
    return _replay_mismatch(example, backends) if example.trace else None


def _replay_mismatch(example, backends):
    """Why ``example``'s trace does not earn ``BFCLEnv``'s reward (a one-line reason), or None: its calls, run in
    order on ``backends`` (fresh, in this process: the data is trusted) as ``BFCLEnv.run_call`` runs them (a function
    that ``revealed_tools`` holds back until a later user turn is unknown until then), must answer what its tool
    responses say and pass ``gold_mismatch``, or the RL terms would punish what the SFT term teaches (a hand-edited
    call or response trained on while every episode making that call earned 0)."""
    revealed = {int(k): set(v) for k, v in example.env.get("revealed_tools", {}).items()}
    hidden = set().union(*revealed.values())
    results, answers = [[]], []  # the trace's results per user turn; (function, result) of the open turn's calls
    for i, m in enumerate(example.trace):
        if m["role"] == "user":
            results.append([])
            hidden -= revealed.get(len(results) - 1, set())
        elif m["role"] == "assistant":
            answers = []
            for call in m.get("tool_calls") or []:
                name = call["function"]["name"]
                if name in hidden:
                    answers.append((name, f"{ERROR}unknown function {name}"))
                else:
                    answers.append((name, backends.execute(name, (), call["function"]["arguments"])))
                    results[-1].append(answers[-1][1])
        else:  # tool responses come in the order of their turn's calls (data.parse_example)
            name, result = answers.pop(0)
            if m["content"] != result:
                return (f"trace[{i}] gives {name!r} the result {excerpt(m['content'])}, where the back-ends answer "
                        f"{excerpt(result)}")
    reason = gold_mismatch(example.env, backends.instances, results)
    return f"the trace's calls do not earn the reward: {reason}" if reason else None


def gold_state(spec):
    """(gold back-ends after every gold call of ``spec``, a row's ``env``; the gold calls' execution results per
    user turn)."""
    gold = BFCLBackends(spec["initial_config"], spec["involved_classes"], bool(spec.get("long_context", False)))
    return gold, [[gold.execute_string(call) for call in turn] for turn in spec["gold"]]


def gold_mismatch(spec, instances, results):
    """Why back-end ``instances`` and per-user-turn call ``results`` fail BFCL's checks against ``spec``'s gold
    calls (one line), or None: every back-end ends in the gold state (public attributes equal, as BFCL's state
    check) and, as BFCL's response check, every gold call's execution result of each user turn is among the results
    of the calls up to that turn (in any order): a final state that needs no call (a task of read-only calls) is
    not paid to an episode that never made them."""
    gold, gold_results = gold_state(spec)
    for name, instance in gold.instances.items():
        for attr, value in vars(instance).items():
            if not attr.startswith("_") and getattr(instances[name], attr) != value:
                return f"{name}.{attr} ends other than the gold calls leave it"
    so_far = collections.Counter()
    for turn, expected in enumerate(gold_results):
        so_far.update(results[turn] if turn < len(results) else [])
        missing = collections.Counter(expected) - so_far
        if missing:
            return f"user turn {turn}'s gold result {excerpt(next(iter(missing)))} is not among the results so far"
    return None


def load_bfcl(category="multi_turn_base", limit=None, *, on_error="raise", report=None):
    """BFCL entries of a multi-turn category as ``Example`` rows (see the module docstring).

    on_error: ``"raise"`` stops at the first entry that does not convert (a ``DataFormatError``
    naming the file, the entry and the reason); ``"skip"`` leaves it out and, when ``report`` (a
    ``pact_fast.data.LoadReport``) is given, records (entry id, reason) in ``report.skipped``.
    In bfcl-eval 2026.3.23, ``multi_turn_miss_func_49`` is such an entry: its gold calls ``tail``
    in turn 1, two turns before BFCL reveals it.
    """
    from ..data import DataFormatError, LoadReport, parse_example

    if category not in CATEGORIES:
        raise ValueError(f"load_bfcl: category {category!r} is not supported; choose one of {CATEGORIES}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"load_bfcl: on_error={on_error!r}; choose 'raise' or 'skip'")
    path = _package_file("data", f"BFCL_v4_{category}.json")
    report = report if report is not None else LoadReport(str(path))
    entries = _read_jsonl(path)
    answers = {a["id"]: a["ground_truth"] for a in _read_jsonl(_package_file("data", "possible_answer",
                                                                              f"BFCL_v4_{category}.json"))}
    examples = []
    for entry in entries[:limit]:
        entry_id = entry.get("id") if isinstance(entry, dict) else None
        try:
            if entry_id not in answers:
                raise ValueError("no ground truth in possible_answer")
            examples.append(parse_example(_entry_example(entry, answers[entry_id], category)))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            reason = f"{type(exc).__name__}: {exc}" if not isinstance(exc, ValueError) else str(exc)
            if on_error == "raise":
                raise DataFormatError(f"{path}: entry {entry_id}: {reason}") from None
            report.skipped.append((entry_id, reason))
    report.loaded = len(examples)
    return examples


class BFCLEnv(ToolEnv):
    """Executes an episode's calls on live back-ends and hands over BFCL's later user turns.

    The back-ends live in a worker process (``Sandbox``): a call that runs past ``call_timeout``
    seconds is stopped and answered with an error, and the back-ends are left as they were before
    it. ``max_call_chars`` and ``max_result_chars`` cap a call's arguments and a response (see
    ``ToolEnv``). Functions BFCL holds back (``multi_turn_miss_func``) are unknown until the user
    turn that reveals them. The gold state for the reward is computed in this process from the
    data's gold calls (trusted data, not model output).
    """

    error_prefix = ERROR
    malformed_response = f"{ERROR}malformed tool call"

    def __init__(self, example, *, max_turns=20, call_timeout=CALL_TIMEOUT_S, max_call_chars=MAX_CALL_CHARS,
                 max_result_chars=MAX_RESULT_CHARS, max_calls_per_turn=MAX_CALLS_PER_TURN):
        super().__init__(max_turns, max_call_chars=max_call_chars, max_result_chars=max_result_chars,
                         max_calls_per_turn=max_calls_per_turn)
        from bfcl_eval.constants.executable_backend_config import CLASS_FILE_PATH_MAPPING

        self.spec = example.env
        for name in self.spec["involved_classes"]:  # imported here, once, rather than in every forked worker
            importlib.import_module(CLASS_FILE_PATH_MAPPING[name])
        self.long_context = bool(self.spec.get("long_context", False))
        classes = self.spec["involved_classes"]
        self.sandbox = Sandbox(BFCLBackends, (self.spec["initial_config"], classes, self.long_context),
                               timeout=call_timeout)
        self.pending = [list(turn) for turn in self.spec["user_turns"]]
        self.turn_index = 0
        self.results = []  # per user turn, the execution results of the episode's calls in it
        self.revealed = {int(k): set(v) for k, v in self.spec.get("revealed_tools", {}).items()}
        self.hidden = set().union(*self.revealed.values())

    def run_call(self, name, arguments):
        if name in self.hidden:
            return f"{ERROR}unknown function {name}", False
        try:
            result = self.sandbox.call("execute", name, (), arguments)
        except SandboxTimeout:
            result = f"{ERROR}{name} ran past the time limit of {self.sandbox.timeout:g} s"
        except RuntimeError as exc:
            result = f"{ERROR}{exc}"
        self.results += [[] for _ in range(self.turn_index + 1 - len(self.results))]
        self.results[self.turn_index].append(result)
        return result, not (result.startswith(ERROR) or _reports_error(result))

    def next_user_turn(self):
        """The next user turn's text once the assistant ends a turn; None when the conversation is over.
        A turn that reveals held-back functions makes them callable from then on."""
        if not self.pending:
            return None
        self.turn_index += 1
        self.hidden -= self.revealed.get(self.turn_index, set())
        return _turn_text(self.pending.pop(0))

    def instances(self):
        """The episode's back-end instances, copied out of the worker process."""
        return self.sandbox.call("snapshot", record=False)

    def gold_state(self):
        """(gold back-ends after every gold call, the gold calls' execution results per user turn)."""
        return gold_state(self.spec)

    def reward(self, final_text):
        """1.0 when the episode's back-ends and call results pass ``gold_mismatch`` (BFCL's state and response
        checks), else 0.0."""
        try:
            mine = self.instances()
        except (SandboxTimeout, RuntimeError):
            return 0.0
        return 0.0 if gold_mismatch(self.spec, mine, self.results) else 1.0

    def close(self):
        """Stop the worker process (it also stops when the environment is garbage-collected)."""
        self.sandbox.close()
