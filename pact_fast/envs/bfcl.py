"""BFCL multi-turn data and executable back-ends as pact_fast examples and an environment.

Needs the ``bfcl-eval`` package, installed without its API-client dependencies:
``pip install --no-deps bfcl-eval`` (its multi-turn back-ends need only the standard library and
mpmath). Data and function docs are read from the installed package; nothing is downloaded.

- ``load_bfcl(category)``: each BFCL entry becomes an ``Example``: the first user turn is the
  prompt; the trace replays BFCL's gold call sequence, one assistant tool call per message with
  the back-end's response, an empty assistant message closing each user turn, and the later user
  turns in between; ``env`` carries the initial back-end configuration and the later user turns.
- ``parse_call``: a BFCL call string (``mv(source='a', destination='b')``) parsed with ``ast``;
  arguments must be literals. Nothing is ever passed to ``eval``.
- ``BFCLBackends``: the back-end instances of an entry; calls dispatch to their public methods.
- ``BFCLEnv``: the environment interface of the rollout. Once the assistant ends a turn,
  ``next_user_turn`` hands over BFCL's next user turn; the reward is 1 when the back-ends end in
  the state the gold calls produce (BFCL's state check).
"""
import ast
import copy
import importlib
import inspect
import json
from importlib import resources

from .base import ToolEnv

CATEGORIES = ("multi_turn_base",)


def _package_file(*parts):
    try:
        root = resources.files("bfcl_eval")
    except ModuleNotFoundError as exc:
        raise ImportError("BFCL support needs bfcl-eval: pip install --no-deps bfcl-eval") from exc
    return root.joinpath(*parts)


def _read_jsonl(path):
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def parse_call(text):
    """``name(arg, key=value, ...)`` -> (name, args list, kwargs dict). Literal arguments only; raises
    ValueError for anything else (attribute calls, nested calls, names, ``**kwargs``)."""
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as exc:
        raise ValueError(f"not a call: {text!r} ({exc.msg})") from None
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        raise ValueError(f"not a plain function call: {text!r}")
    try:
        args = [ast.literal_eval(a) for a in node.args]
        if any(k.arg is None for k in node.keywords):
            raise ValueError("**kwargs")
        kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    except (ValueError, TypeError, SyntaxError):
        raise ValueError(f"arguments of {text!r} must be literals") from None
    return node.func.id, args, kwargs


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
        """Run one call; errors become BFCL-style error texts, never exceptions."""
        method = self.methods.get(name)
        if method is None:
            return f"Error during execution: unknown function {name}"
        try:
            return _format_result(method(*args, **(kwargs or {})))
        except Exception as exc:  # a back-end error is an observation for the model
            return f"Error during execution: {exc}"

    def execute_string(self, text):
        try:
            name, args, kwargs = parse_call(text)
        except ValueError as exc:
            return f"Error during execution: {exc}"
        return self.execute(name, args, kwargs)


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


def load_bfcl(category="multi_turn_base", limit=None):
    """BFCL entries of a multi-turn category as ``Example`` rows (see the module docstring)."""
    from ..data import parse_example

    if category not in CATEGORIES:
        raise ValueError(f"load_bfcl: category {category!r} is not supported; choose one of {CATEGORIES}")
    entries = _read_jsonl(_package_file("data", f"BFCL_v4_{category}.json"))
    answers = {a["id"]: a["ground_truth"] for a in _read_jsonl(_package_file("data", "possible_answer",
                                                                              f"BFCL_v4_{category}.json"))}
    examples = []
    for entry in entries[:limit]:
        classes = entry["involved_classes"]
        backends = BFCLBackends(entry["initial_config"], classes)
        trace, n_call = [], 0
        for turn, (question, calls) in enumerate(zip(entry["question"], answers[entry["id"]])):
            if turn:
                trace += [{"role": "user", "content": m["content"]} for m in question]
            for call in calls:
                name, args, kwargs = parse_call(call)
                if args:  # positional arguments become the method's parameter names
                    params = list(inspect.signature(backends.methods[name]).parameters)
                    kwargs = {**dict(zip(params, args)), **kwargs}
                n_call += 1
                cid = f"call{n_call}"
                trace.append({"role": "assistant", "content": "", "tool_calls": [
                    {"id": cid, "type": "function", "function": {"name": name, "arguments": kwargs}}]})
                trace.append({"role": "tool", "tool_call_id": cid, "content": backends.execute(name, (), kwargs)})
            trace.append({"role": "assistant", "content": ""})
        examples.append(parse_example({
            "id": entry["id"], "messages": entry["question"][0], "tools": [_tool_spec(d) for d in _func_docs(classes)],
            "trace": trace, "answer": None,
            "env": {"name": "bfcl", "category": category, "initial_config": entry["initial_config"],
                    "involved_classes": classes, "user_turns": entry["question"][1:],
                    "gold": answers[entry["id"]]}}))
    return examples


class BFCLEnv(ToolEnv):
    """Executes an episode's calls on live back-ends and hands over BFCL's later user turns."""

    malformed_response = "Error during execution: malformed tool call"

    def __init__(self, example, *, max_turns=20):
        super().__init__(max_turns)
        self.spec = example.env
        self.backends = BFCLBackends(self.spec["initial_config"], self.spec["involved_classes"])
        self.pending = [list(turn) for turn in self.spec["user_turns"]]

    def run_call(self, name, arguments):
        result = self.backends.execute(name, (), arguments)
        return result, not result.startswith("Error during execution")

    def next_user_turn(self):
        """The next user turn's text once the assistant ends a turn; None when the conversation is over."""
        if not self.pending:
            return None
        return "\n".join(m["content"] for m in self.pending.pop(0))

    def gold_state(self):
        gold = BFCLBackends(self.spec["initial_config"], self.spec["involved_classes"])
        for turn in self.spec["gold"]:
            for call in turn:
                gold.execute_string(call)
        return gold

    def reward(self, final_text):
        """1.0 when every back-end ends in the gold state (public attributes equal, as BFCL's state check)."""
        gold = self.gold_state()
        for name, instance in gold.instances.items():
            mine = self.backends.instances[name]
            for attr, value in vars(instance).items():
                if not attr.startswith("_") and getattr(mine, attr) != value:
                    return 0.0
        return 1.0
