"""A seeded, offline, ToolHop-like multi-hop tool environment.

A small world of people, companies, cities and countries is drawn from a seed. A task asks for
something that needs several dependent tool calls, e.g. "what is the country of the city of the
employer of maya ?" (three look-ups) or "what is the age of omar plus 7 ?" (a look-up, then
``add``). Tools execute in Python on parsed arguments, never by ``eval`` of model text. Every
task comes with the expert trace that solves it; a distractor count adds unused tools.
"""
import random
import re
from dataclasses import dataclass, field

from ..toolcalls import ToolCall, excerpt
from .base import ToolEnv, unread_env_key

PEOPLE = ["maya", "omar", "lena", "ivan", "nora", "theo", "zara", "hugo", "iris", "felix", "ada", "kai",
          "luca", "mina", "otto", "rosa"]
COMPANIES = ["acme", "globex", "initech", "umbrella", "hooli", "vandelay", "stark", "wayne"]
CITIES = ["paris", "lagos", "lima", "oslo", "kyoto", "quito", "dakar", "perth", "delhi", "tunis"]
COUNTRIES = ["france", "nigeria", "peru", "norway", "japan", "ecuador", "senegal", "australia", "india",
             "tunisia"]
# relation -> (source kind, target kind)
RELATIONS = {"employer": ("person", "company"), "home": ("person", "city"), "age": ("person", "number"),
             "headquarters": ("company", "city"), "country": ("city", "country"), "founded": ("company", "number")}
CHAINS = {  # hops -> relation paths starting at a person
    1: [["employer"], ["home"], ["age"]],
    2: [["employer", "headquarters"], ["home", "country"], ["employer", "founded"]],
    3: [["employer", "headquarters", "country"]],
}
TOOLS = {
    "lookup": {"description": "look up a relation of an entity",
               "parameters": {"entity": "string", "relation": "string"}},
    "add": {"description": "add two numbers", "parameters": {"a": "number", "b": "number"}},
    "initial": {"description": "first letter of a word", "parameters": {"word": "string"}},
}
DISTRACTORS = {
    "multiply": {"description": "multiply two numbers", "parameters": {"a": "number", "b": "number"}},
    "subtract": {"description": "subtract b from a", "parameters": {"a": "number", "b": "number"}},
    "length": {"description": "number of letters of a word", "parameters": {"word": "string"}},
}
LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]


def tool_specs(n_distractors=0):
    """OpenAI-style function specs of the tools a task offers."""
    names = list(TOOLS) + list(DISTRACTORS)[:n_distractors]
    specs = []
    for name in names:
        spec = TOOLS.get(name) or DISTRACTORS[name]
        specs.append({"type": "function", "function": {
            "name": name, "description": spec["description"],
            "parameters": {"type": "object", "properties": {k: {"type": v} for k, v in spec["parameters"].items()},
                           "required": list(spec["parameters"])}}})
    return specs


@dataclass
class World:
    """Relation tables: facts[relation][entity] = value."""

    facts: dict = field(default_factory=dict)

    @classmethod
    def sample(cls, seed):
        rng = random.Random(seed)
        facts = {r: {} for r in RELATIONS}
        for p in PEOPLE:
            facts["employer"][p] = rng.choice(COMPANIES)
            facts["home"][p] = rng.choice(CITIES)
            facts["age"][p] = rng.randint(18, 79)
        for c in COMPANIES:
            facts["headquarters"][c] = rng.choice(CITIES)
            facts["founded"][c] = rng.randint(10, 99)
        for city, country in zip(CITIES, COUNTRIES):
            facts["country"][city] = country
        return cls(facts)


class ToolError(Exception):
    """A tool call the environment rejects; becomes an error observation for the model."""


def execute(world, name, arguments, allowed):
    """Run one parsed tool call. arguments: dict of str -> str/int. Returns the response text."""
    spec = TOOLS.get(name) or DISTRACTORS.get(name)
    if name not in allowed or spec is None:
        raise ToolError(f"unknown tool {name}")
    missing = [p for p in spec["parameters"] if p not in arguments]
    extra = [a for a in arguments if a not in spec["parameters"]]
    if missing or extra:
        raise ToolError(f"bad arguments for {name}")
    nums = {}
    for p, kind in spec["parameters"].items():
        if kind == "number":
            value = arguments[p]
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ToolError(f"{p} must be a whole number")  # int() read true as 1 and 3.9 as 3
            try:
                nums[p] = int(value)
            except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf) from JSON's 1e999
                raise ToolError(f"{p} must be a number") from None
    if name == "lookup":
        table = world.facts.get(str(arguments["relation"]))
        if table is None:
            raise ToolError("unknown relation")
        value = table.get(str(arguments["entity"]))
        if value is None:
            raise ToolError("unknown entity")
        return str(value)
    if name in ("add", "multiply", "subtract"):
        a, b = nums["a"], nums["b"]
        value = a + b if name == "add" else a * b if name == "multiply" else a - b
        try:
            return str(value)
        except ValueError:  # past Python's int-to-string digit limit (4300 by default)
            raise ToolError("the result has too many digits") from None
    if name == "initial":
        return str(arguments["word"])[:1] or "none"
    if name == "length":
        return str(len(str(arguments["word"])))
    raise ToolError(f"unknown tool {name}")


def _phrase(path, start):
    text = start
    for rel in path:
        text = f"the {rel} of {text}"
    return text


def make_task(seed, hops=2, n_distractors=0, world_seed=0, ops=True):
    """One task as a data row (``pact_fast.data`` format) with its expert trace.

    hops: look-ups before the answer (1..3). ops: some tasks add a final ``add`` (numbers) or ``initial``
    (words) step. n_distractors: unused tools offered besides the needed ones.
    """
    if hops not in CHAINS:
        raise ValueError(f"make_task: hops={hops}; choose one of {sorted(CHAINS)}")
    world = World.sample(world_seed)
    rng = random.Random(seed)
    path = rng.choice(CHAINS[hops])
    person = rng.choice(PEOPLE)
    value, entity, trace, calls = None, person, [], 0
    numeric = RELATIONS[path[-1]][1] == "number"
    extra = rng.choice(["add", "none"]) if numeric else rng.choice(["initial", "none", "none"])
    if not ops:
        extra = "none"
    question = _phrase(path, person)
    if extra == "add":
        k = rng.randint(1, 9)
        question = f"what is {question} plus {k} ?"
    elif extra == "initial":
        question = f"what is the initial of {question} ?"
    else:
        question = f"what is {question} ?"

    def call(name, args, reasoning):
        nonlocal calls
        calls += 1
        cid = f"call{calls}"
        result = execute(world, name, args, set(TOOLS))
        trace.append({"role": "assistant", "reasoning_content": reasoning, "content": "",
                      "tool_calls": [{"id": cid, "type": "function",
                                      "function": {"name": name, "arguments": dict(args)}}]})
        trace.append({"role": "tool", "tool_call_id": cid, "content": result})
        return result

    for i, rel in enumerate(path):
        then = "first" if i == 0 else "then"
        value = call("lookup", {"entity": entity, "relation": rel},
                     f"i need {_phrase(path[i:], entity)} . {then} i look up the {rel} of {entity} .")
        entity = value
    if extra == "add":
        value = call("add", {"a": int(value), "b": k}, f"the {path[-1]} is {value} . now i add {k} .")
    elif extra == "initial":
        value = call("initial", {"word": value}, f"the {path[-1]} is {value} . now i take its initial .")
    trace.append({"role": "assistant", "reasoning_content": f"the answer is {value} .", "content": str(value)})
    return {
        "id": f"multihop-{world_seed}-{seed}",
        "messages": [{"role": "system", "content": "you answer questions with tools . reply with the answer only ."},
                     {"role": "user", "content": question}],
        "tools": tool_specs(n_distractors),
        "trace": trace,
        "answer": str(value),
        "env": {"name": "multihop", "world_seed": world_seed},
    }


def make_tasks(n, seed=0, hops=(1, 2), n_distractors=0, world_seed=0, ops=True):
    """n tasks with hop counts cycling through ``hops``; task seeds derive from ``seed``."""
    rng = random.Random(seed)
    return [make_task(rng.randrange(2 ** 31), hops=hops[i % len(hops)], n_distractors=n_distractors,
                      world_seed=world_seed, ops=ops) for i in range(n)]


def vocabulary():
    """Every word the environment's tasks, traces and tool responses can contain."""
    words = set(PEOPLE + COMPANIES + CITIES + COUNTRIES + list(RELATIONS) + list(TOOLS) + list(DISTRACTORS) + LETTERS)
    for spec in list(TOOLS.values()) + list(DISTRACTORS.values()):
        words.update(spec["description"].split())
        words.update(spec["parameters"])
    words.update("what is the of plus ? . i need first then look up now add take its initial answer you answer "
                 "questions with tools reply only error unknown tool bad arguments for must be a number relation "
                 "entity none".split())
    return sorted(words)


def normalise_answer(text):
    """Compare answers without whitespace or case (word-level decoding puts spaces between digits)."""
    return re.sub(r"\s+", "", str(text)).lower()


def final_answer(text):
    """The answer part of an assistant turn: after any ``</think>``, before ``<|im_end|>`` (the engines hand over
    the final turn without the tokenizer's end-of-turn token, whatever it is)."""
    text = text.split("</think>")[-1]
    return text.split("<|im_end|>")[0].strip()


class MultiHopEnv(ToolEnv):
    """Episode state of one task: executes parsed calls, limits turns, scores the final answer.

    reward = 1 for an exact answer (after ``normalise_answer``), plus ``format_reward`` when the episode
    made tool calls and every one parsed and ran without error. Tools run in this process: each is a
    table look-up or one arithmetic operation on arguments that ``ToolEnv`` has size-capped (and
    integers parse only up to Python's 4300-digit limit), so no call can run long. ``caps``:
    ``max_call_chars`` / ``max_result_chars`` of ``ToolEnv``.
    """

    def __init__(self, example, *, max_turns=6, format_reward=0.0, **caps):
        super().__init__(max_turns, **caps)
        spec = example.env or {}
        self.world = World.sample(int(spec.get("world_seed", 0)))
        self.allowed = {t["function"]["name"] for t in example.tools} or set(TOOLS)
        self.answer = example.answer
        self.format_reward = format_reward

    def run_call(self, name, arguments):
        try:
            return execute(self.world, name, arguments, self.allowed), True
        except ToolError as exc:
            return f"error : {exc}", False

    def reward(self, final_text):
        correct = normalise_answer(final_answer(final_text)) == normalise_answer(self.answer)
        clean_calls = self.turns > 0 and self.errors == 0
        return float(correct) + (self.format_reward if clean_calls else 0.0)


ENV_KEYS = ("name", "world_seed")  # what a row's env gives MultiHopEnv


def check_example(example):
    """Why ``example`` cannot train against ``MultiHopEnv`` (a one-line reason), or None. Its tools must be the
    environment's own (it runs no other), each spec with the arguments the environment runs it with, all required; its
    ``answer`` a string or an integer, as the reward compares it as text; its trace one user turn (the environment hands
    over no later one), and, replayed here, the trace's tool results must be what the environment answers in its world
    (``env.world_seed``) and its final answer must earn the reward (``data.parse_example`` has refused a trace that does
    not end with one). Otherwise the RL terms would punish what the SFT term teaches. ``env`` holds ``ENV_KEYS`` only:
    another key (a typo of ``world_seed``) would be ignored, and the task run in world 0."""
    unread = unread_env_key(example.env, "multihop", ENV_KEYS)
    if unread:
        return unread
    own = set(TOOLS) | set(DISTRACTORS)
    foreign = [t["function"]["name"] for t in example.tools if t["function"]["name"] not in own]
    if foreign:
        return (f"env 'multihop' runs only its own tools ({', '.join(sorted(own))}); the row lists {foreign[0]!r}: "
                "give such rows an environment that runs their tools")
    for t in example.tools:  # a spec of other arguments: the model calls as it reads, every call fails
        name, schema = t["function"]["name"], t["function"]["parameters"]
        wants = sorted((TOOLS.get(name) or DISTRACTORS[name])["parameters"])
        given, required = sorted(schema.get("properties") or {}), sorted(schema.get("required", []))
        if given != wants or required != wants:
            return (f"the row's spec of {name!r} lists the arguments {given} (required: {required}); env 'multihop' "
                    f"runs {name} with {wants}, all required")
    if not isinstance(example.answer, (str, int)) or isinstance(example.answer, bool):
        return (f"'answer' must be a string or an integer for the multihop reward (it compares the final answer "
                f"as text), got {type(example.answer).__name__}")
    later = next((i for i, m in enumerate(example.trace) if m["role"] == "user"), None)
    if later is not None:
        return f"trace[{later}] is a later user turn, but env 'multihop' has one user turn and hands over no other"
    if not any(m["role"] == "assistant" for m in example.trace):
        return None
    env = MultiHopEnv(example, max_turns=len(example.trace) + 1)
    results, final = [], ""
    for i, m in enumerate(example.trace):
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = [ToolCall(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"]]
            results = list(zip(env.step(calls), (c.name for c in calls)))
        elif m["role"] == "tool":
            expected, name = results.pop(0)
            if m["content"].strip() != expected.strip():
                return (f"trace[{i}] gives {name!r} the result {excerpt(m['content'])}, where the environment (world "
                        f"{example.env.get('world_seed', 0)}) answers {excerpt(expected)}")
        elif m["role"] == "assistant":
            final = m.get("content") or ""
    if env.reward(final) < 1.0:
        return (f"the trace's final answer {excerpt(final_answer(final))} does not earn the reward against 'answer' "
                f"{excerpt(str(example.answer))}")
    return None
