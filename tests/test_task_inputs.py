"""Every task is tokenised and checked before the first step (pact_fast/task_inputs.py): a row too long for the
model's positions or for a micro-batch, or whose trace renders to nothing, is one line naming file, line and id
before any step, where the step that first drew it used to stop (or, past the positions, run on quietly)."""
import json
import math
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from pact_fast import task_inputs
from pact_fast.config import load_config
from pact_fast.data import DataFormatError, load_examples, parse_example
from pact_fast.envs import build_tokenizer, make_tasks, min_turns
from pact_fast.model_setup import build_model_and_tokenizer
from pact_fast.packing import pack_tree, packed_size
from pact_fast.rollout import Episode
from pact_fast.task_inputs import Limits, check_lengths, group_inputs, limits, prepare, response_cap
from pact_fast.trainer import build, build_units, train_step

from test_trainer import HERE, TINY, tiny_for


def load_examples_from(rows):
    return [parse_example(r) for r in rows]


def _rows(n=6):
    return make_tasks(n, seed=0, world_seed=0, hops=(1,), n_distractors=0, ops=False)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _long_reasoning(row, words):
    row["trace"][0]["reasoning_content"] = " ".join(["hugo"] * words)
    return row


@pytest.fixture(scope="module")
def tiny():
    """(model, tokenizer) of the built-in tiny model."""
    cfg = load_config(None, TINY)
    return build_model_and_tokenizer(cfg.model, torch.device("cpu"), cfg.train.seed)


def test_a_trace_too_long_for_a_micro_batch_stops_the_cli_before_any_step(tmp_path):
    rows = _rows()
    _long_reasoning(rows[2], 900)  # the trace-conditioned prompt carries the trace: ~900 tokens over a 700 budget
    data = _write(tmp_path / "data.jsonl", rows)
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "pact_fast", "train", "--data", str(data), "--out", str(run),
                           *tiny_for(data_path=True)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(HERE.parent)},
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("pact-fast:")]
    assert len(lines) == 1, proc.stderr
    assert f"{data}:3 (id {rows[2]['id']!r})" in lines[0] and "train.micro_batch_tokens=700" in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    assert not run.exists(), "refused before the run directory is made"


def test_build_refuses_a_row_past_the_models_positions_naming_it(tmp_path):
    rows = _rows()
    _long_reasoning(rows[4], 2100)  # the tiny model has 2048 positions; the budget is raised out of the way
    data = _write(tmp_path / "data.jsonl", rows)
    cfg = load_config(None, tiny_for(data_path=True) + [f"data.path={data}", f"train.out_dir={tmp_path / 'run'}",
                                                        "train.micro_batch_tokens=100000"])
    with pytest.raises(DataFormatError, match=rf"{data}:5 \(id '{rows[4]['id']}'\): its trace-conditioned prompt "
                                              r"needs 2,\d\d\d positions, more than the model's 2,048"):
        build(cfg, log=lambda *_: None)
    assert not (tmp_path / "run").exists()


def test_a_held_out_prompt_past_the_positions_is_refused(tmp_path):
    rows, held = _rows(), _rows(8)[6:]
    held[1]["messages"][-1]["content"] = " ".join(["hugo"] * 2100)
    data, eval_data = _write(tmp_path / "d.jsonl", rows), _write(tmp_path / "e.jsonl", held)
    cfg = load_config(None, tiny_for(data_path=True, eval_path=True) + [f"data.path={data}", f"data.eval_path={eval_data}",
                                    f"train.out_dir={tmp_path / 'run'}"])
    with pytest.raises(DataFormatError, match=rf"{eval_data}:2 \(id '{held[1]['id']}'\): its prompt and one sampled "
                                              r"token need 2,\d+ positions, more than the model's "
                                              r"max_position_embeddings=2,048"):
        build(cfg, log=lambda *_: None)


def test_the_lengths_bound_what_a_step_packs(tiny):
    """check_lengths passes a task whose rollout unit packs to exactly the budget and refuses one token less; the
    bound it checks is the unit a step packs with one response token. Scored sequences are held to the model's
    positions, the sampled prompt to the engine's (vLLM's max_model_len when tighter)."""
    model, tok = tiny
    example = load_examples_from(_rows(1))[0]
    gi = group_inputs(tok, example)
    ep = Episode(prompt_ids=gi.po_prompt, response_ids=[5], response_mask=[1])
    unit = build_units([[ep]], [gi])[0]
    size = len(pack_tree(unit.sequences).input_ids)
    assert max(len(s.input_ids) for s in gi.sft) < size  # the rollout unit binds first here
    check_lengths(example, gi, Limits(size))
    with pytest.raises(DataFormatError, match=f"pack to {size:,} tokens, more than train.micro_batch_tokens="
                                              f"{size - 1:,}"):
        check_lengths(example, gi, Limits(size - 1))
    n = len(gi.tc_prompt) + 1
    check_lengths(example, gi, Limits(size, positions=n))
    with pytest.raises(DataFormatError, match=f"task {example.id!r}: its trace-conditioned prompt needs {n:,} "
                                              f"positions, more than the model's {n - 1:,}"):
        check_lengths(example, gi, Limits(size, positions=n - 1))
    m = len(gi.po_prompt) + 1
    assert m < n  # the trace-conditioned prompt carries the trace
    check_lengths(example, gi, Limits(size, sampling=m))
    with pytest.raises(DataFormatError, match=f"its prompt and one sampled token need {m:,} positions, more than "
                                              f"x={m - 1}"):
        check_lengths(example, gi, Limits(size, sampling=m - 1, sampling_name="x"))

    cfg = load_config(None, TINY)
    assert limits(model, cfg) == Limits(700, 2048, 2048, "the model's max_position_embeddings", 2, 10)
    vllm = load_config(None, TINY + ["rollout.engine=vllm", "rollout.vllm_max_model_len=1024"])
    # vLLM samples the prompt-only prompt within its max_model_len; the trainer scores longer sequences
    assert limits(model, vllm) == Limits(700, 2048, 1024, "rollout.vllm_max_model_len", 2, 10)
    caps = load_config(None, TINY + ["rollout.max_call_chars=20000", "rollout.max_calls_per_turn=2",
                                     "rollout.max_result_chars=50"])
    assert limits(model, caps) == Limits(700, 2048, 2048, "the model's max_position_embeddings", 2, 10,
                                         max_call_chars=20_000, max_calls_per_turn=2, max_result_chars=50)


def test_a_longrope_model_keeps_its_sequences_where_its_frequencies_stay(tiny):
    """Packed scoring refuses a longrope group past original_max_position_embeddings (each sequence alone would get
    the frequencies of its own length): the run's limits stop there, not at max_position_embeddings, so a row that
    needs more is refused at start-up naming why, and episodes are cut to it, instead of a step failing later."""
    from transformers import AutoConfig, AutoModelForCausalLM

    _, tok = tiny
    shape = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096, original_max_position_embeddings=64,
                 sliding_window=None, pad_token_id=tok.pad_token_id)
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("phi3", **shape, rope_parameters=rope))
    lim = limits(model, load_config(None, TINY))
    assert (lim.positions, lim.sampling) == (64, 64)
    example = load_examples_from(_rows(1))[0]
    with pytest.raises(DataFormatError, match="more than the model's 64 \\(where its longrope rotary frequencies "
                                              "change\\)"):
        check_lengths(example, group_inputs(tok, example), lim)
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model("phi3", **shape))  # default rotary embedding
    assert limits(plain, load_config(None, TINY)).positions == 4096


def test_a_trace_sequence_longer_than_the_budget_is_refused(tiny):
    _, tok = tiny
    example = load_examples_from(_rows(1))[0]
    gi = group_inputs(tok, example)
    gi.tc_prompt = gi.po_prompt[:]  # a rollout unit as short as its prompt, so the trace sequence binds
    n = max(len(s.input_ids) for s in gi.sft)
    check_lengths(example, gi, Limits(n))
    with pytest.raises(DataFormatError, match=f"trace sequence 0 is {n:,} tokens, more than"):
        check_lengths(example, gi, Limits(n - 1))


def test_a_trace_call_the_template_drops_is_refused_before_any_step(tmp_path):
    """Before, the first step that drew the row stopped on it; now ``prepare`` (build) names file and line."""
    from test_chat import NO_CALLS_TEMPLATE

    tok = build_tokenizer()
    path = _write(tmp_path / "d.jsonl", _rows(3))
    examples, _ = load_examples(path)
    assert prepare(tok, examples, [], Limits(10_000)) == (examples, [])
    tok.chat_template = NO_CALLS_TEMPLATE
    with pytest.raises(DataFormatError, match=rf"^{path}:1 \(id '[^']*'\): assistant turn 0 has 1 tool call"):
        prepare(tok, examples, [], Limits(10_000))


def test_skip_leaves_out_the_rows_that_do_not_fit_and_says_so(tiny):
    """data.on_error=skip covers these checks as it covers malformed rows: the rows left out are counted with the
    first reason; none left of a split is still an error."""
    _, tok = tiny
    rows = _rows(5)
    _long_reasoning(rows[1], 900)
    held = _rows(8)[5:]
    held[0]["messages"][-1]["content"] = " ".join(["hugo"] * 900)
    train, held_out = load_examples_from(rows), load_examples_from(held)
    lines = []
    kept, kept_held_out = prepare(tok, train, held_out, Limits(700, 2048, 600), on_error="skip", log=lines.append)
    assert [ex.id for ex in kept] == [r["id"] for k, r in enumerate(rows) if k != 1]
    assert [ex.id for ex in kept_held_out] == [r["id"] for r in held[1:]]
    assert lines[0].startswith(f"[pact_fast] 1 training rows skipped (data.on_error=skip); first: task "
                               f"{rows[1]['id']!r}: its trace-conditioned and prompt-only prompts, with one "
                               "response token each, pack to"), lines
    assert lines[1].startswith(f"[pact_fast] 1 held-out rows skipped (data.on_error=skip); first: task "
                               f"{held[0]['id']!r}: its prompt and one sampled token need"), lines
    with pytest.raises(DataFormatError, match=r"no training row fits a step \(1 skipped\); first: task"):
        prepare(tok, train[1:2], held_out, Limits(700), on_error="skip")
    with pytest.raises(DataFormatError, match=f"task {rows[1]['id']!r}"):
        prepare(tok, train, held_out, Limits(700))


def test_prepare_checks_every_task_and_reports_progress(tiny, monkeypatch):
    _, tok = tiny
    examples = load_examples_from(_rows(4))
    lines = []
    monkeypatch.setattr(task_inputs, "PROGRESS_EVERY_S", -1.0)
    assert prepare(tok, examples, examples[:1], Limits(10_000, 2048, 2048), log=lines.append) == (examples,
                                                                                                    examples[:1])
    assert lines[3] == "[pact_fast] checked 4 of 4 training tasks (0 s)" and lines[4].startswith(
        "[pact_fast] checked 1 of 1 held-out tasks"), lines


def test_rows_read_from_a_file_know_their_line(tmp_path):
    path = _write(tmp_path / "d.jsonl", _rows(3))
    examples, _ = load_examples(path)
    assert [ex.source for ex in examples] == [f"{path}:{k}" for k in (1, 2, 3)]
    assert examples[1].where() == f"{path}:2 (id {examples[1].id!r})"
    assert "source" not in examples[0].to_json()
    assert load_examples_from(_rows(1))[0].where().startswith("task ")


def test_response_cap_is_the_longest_response_whose_unit_fits(tiny):
    """An episode of response_cap tokens packs within every limit; one token more would not (the cap binds on the
    budget, the positions or the sampled prompt, whichever is tightest)."""
    _, tok = tiny
    gi = group_inputs(tok, load_examples_from(_rows(1))[0])
    prompts = packed_size([gi.tc_prompt, gi.po_prompt])

    def unit_size(r):
        ep = Episode(prompt_ids=gi.po_prompt, response_ids=list(range(3, 3 + r)), response_mask=[1] * r)
        return packed_size(build_units([[ep]], [gi])[0].sequences)

    for budget in (prompts + 2, prompts + 9, prompts + 40):
        cap = response_cap(gi, Limits(budget))
        assert unit_size(cap) <= budget < unit_size(cap + 1)
    n = len(gi.tc_prompt) + 7
    assert response_cap(gi, Limits(10_000, positions=n)) == 7
    assert response_cap(gi, Limits(10_000, sampling=len(gi.po_prompt) + 5)) == 5


@pytest.mark.parametrize("cap, turns, calls, errors", [(7, 2, 2, 1), (8, 2, 3, 1), (9, 2, 3, 1), (10, 3, 3, 1),
                                                        (3, 1, 2, 1), (2, 1, 0, 0)])
def test_a_cut_episode_counts_the_turns_and_calls_it_keeps(tiny, cap, turns, calls, errors):
    """Three turns sampled at [0, 3), [5, 8) and [9, 11), the first making two tool calls (one failed), the second
    one: cut to ``cap`` tokens, a turn counts when it sampled a token before the cut, its calls when its whole
    text is kept (the metrics counted the cut part before)."""
    _, tok = tiny
    gi = group_inputs(tok, load_examples_from(_rows(1))[0])
    mask = [1, 1, 1, 0, 0, 1, 1, 1, 0, 1, 1]
    ep = Episode(prompt_ids=gi.po_prompt, response_ids=list(range(3, 14)), response_mask=list(mask),
                 behavior_logp=[-1.0] * 11, reward=1.0, turns=3, tool_calls=3, tool_errors=1, finish="answer",
                 turn_tools=[(2, 1), (1, 0), (0, 0)])
    lim = Limits(10_000, positions=len(gi.tc_prompt) + cap)
    assert response_cap(gi, lim) == cap
    assert task_inputs.fit_episodes([[ep]], [gi], lim) == 1
    assert (ep.turns, ep.tool_calls, ep.tool_errors) == (turns, calls, errors)
    assert len(ep.response_ids) == len(ep.response_mask) == len(ep.behavior_logp) == cap
    assert (ep.finish, ep.reward) == ("length", 0.0)


def test_a_cut_episode_of_a_foreign_engine_keeps_its_counts(tiny):
    """An engine of the user's that records no per-turn tool counts: a cut leaves turns and calls as they were
    (nothing to recount from), and still cuts the response."""
    _, tok = tiny
    gi = group_inputs(tok, load_examples_from(_rows(1))[0])
    ep = Episode(prompt_ids=gi.po_prompt, response_ids=list(range(3, 9)), response_mask=[1] * 6,
                 behavior_logp=[-1.0] * 6, turns=2, tool_calls=4)
    task_inputs.fit_episodes([[ep]], [gi], Limits(10_000, positions=len(gi.tc_prompt) + 2))
    assert (ep.turns, ep.tool_calls, len(ep.response_ids)) == (2, 4, 2)


def test_an_episode_longer_than_its_step_is_cut_not_fatal(tmp_path):
    """A step whose episode outgrew the micro-batch budget used to stop the run in split_units (and a resume drew
    the same episode again); fit_episodes cuts it to its task's cap as an episode that ran out of length."""
    cfg = load_config(None, TINY + [f"train.out_dir={tmp_path}", "rollout.max_new_tokens=24", "rollout.max_turns=3"])
    c = build(cfg, log=lambda *_: None)
    widest = max(packed_size([gi.tc_prompt, gi.po_prompt]) for gi in (group_inputs(c.tokenizer, ex)
                                                                        for ex in c.train_set))
    budget = widest + 2 * 4  # every task keeps at least 4 response tokens; a 24-token turn does not fit
    c.config.train.micro_batch_tokens = budget
    c.limits = replace(c.limits, micro_batch_tokens=budget)
    stats = train_step(c, 0)
    cut = [ep for ep in stats.episodes if ep.finish == "length" and ep.reward == 0.0]
    assert stats.truncated > 0 and len(cut) >= stats.truncated
    assert stats.metrics()["truncated_episodes"] == stats.truncated
    for ep in stats.episodes:  # the engine's per-turn counts add up; a cut one's turns are what it kept
        assert len(ep.turn_tools) == ep.turns and sum(c for c, _ in ep.turn_tools) == ep.tool_calls
        assert len(task_inputs._sampled_spans(ep.response_mask)) == ep.turns
    assert math.isfinite(stats.grad_norm) and not stats.skipped
    assert stats.packed_tokens <= budget * stats.micro_batches


def test_a_resume_whose_data_draws_other_rows_is_refused(tmp_path):
    """The checkpoint's data order names the rows it draws from (count and a hash of the ids): a resume whose
    data gives other rows is one line before any step. Before, fewer rows crashed mid-step (IndexError) and
    other rows of the same count were drawn quietly."""
    base = TINY + [f"train.out_dir={tmp_path}", "train.steps=2", "train.stop_after=1", "data.eval_tasks=2"]
    from pact_fast.trainer import train

    train(load_config(None, base), log=lambda *_: None)
    build(load_config(None, base), resume=tmp_path, log=lambda *_: None)  # the same data resumes
    with pytest.raises(DataFormatError, match=r"drew from 24 training rows; this config's data gives 20 \(the data"):
        build(load_config(None, base + ["data.train_tasks=20"]), resume=tmp_path, log=lambda *_: None)
    with pytest.raises(DataFormatError, match="drew from 24 training rows; this config's data gives 24 other ones"):
        build(load_config(None, base + ["data.world_seed=5"]), resume=tmp_path, log=lambda *_: None)


def test_a_resume_with_another_data_seed_is_refused(tmp_path):
    """The checkpoint's data order keeps the run's data.seed: a resume with another one said "changed data.seed"
    and saved it in config.yaml, yet drew the rest of the epoch from the old seed's order (a data file's rows are
    the same whatever the seed, so nothing else refused it)."""
    from pact_fast.checkpoint import CheckpointError
    from pact_fast.data import write_examples
    from pact_fast.trainer import train

    data = tmp_path / "tasks.jsonl"
    write_examples(data, make_tasks(12, seed=0, hops=(1,), ops=False))
    base = tiny_for(data_path=True) + [f"data.path={data}", f"train.out_dir={tmp_path / 'run'}", "train.steps=2",
                                       "train.stop_after=1"]
    train(load_config(None, base), log=lambda *_: None)
    with pytest.raises(CheckpointError, match=r"draws its data order from data.seed=0; this config has data.seed=5, "
                                              r"which cannot change on resume"):
        build(load_config(None, base + ["data.seed=5"]), resume=tmp_path / "run", log=lambda *_: None)


def test_a_chat_template_the_run_cannot_use_is_a_model_error(tiny):
    """model.chat_template=model with a template that drops tool calls: a ModelError (one line from the CLI),
    not a traceback."""
    from test_chat import NO_CALLS_TEMPLATE

    from pact_fast.model_setup import fit_chat_template
    from pact_fast.models import ModelError

    tok = build_tokenizer()
    tok.chat_template = NO_CALLS_TEMPLATE
    cfg = load_config(None, ["model.path=/a/pretrained/model", "model.chat_template=model"])  # a pretrained model's
    with pytest.raises(ModelError, match="^model.chat_template=model: chat_template=model, but the model's chat "
                                         "template cannot be trained on tool use"):
        fit_chat_template(cfg, tok, load_examples_from(_rows(1)), log=None)


def test_cut_episodes_are_said_on_the_console(tmp_path, monkeypatch):
    from pact_fast import trainer

    probe = build(load_config(None, TINY + [f"train.out_dir={tmp_path / 'probe'}"]), log=lambda *_: None)
    widest = max(packed_size([gi.tc_prompt, gi.po_prompt]) for gi in (group_inputs(probe.tokenizer, ex)
                                                                        for ex in probe.train_set))
    lines = []
    trainer.train(load_config(None, TINY + [f"train.out_dir={tmp_path / 'run'}", "train.steps=3", "train.eval_every=0",
                                            f"train.micro_batch_tokens={widest + 8}", "rollout.max_new_tokens=24"]),
                  log=lines.append)
    said = [line for line in lines if "episodes were cut to fit train.micro_batch_tokens" in line]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    cut = [r["truncated_episodes"] for r in rows if "truncated_episodes" in r]
    assert cut and cut[0] > 0
    assert len(said) == 1 and said[0].startswith(f"[pact_fast] step 1: {cut[0]} of 8 episodes were cut")


def test_tasks_that_could_never_be_rewarded_within_max_turns_are_said(tiny):
    """rollout.max_turns=3 (the default) ran BFCL tasks of 4-14 user turns and tool calls, which no episode could
    finish: every rollout earned 0 and nothing said so. A multi-hop task needs a call turn and an answer turn."""
    _, tok = tiny
    rows = load_examples_from(_rows(3))
    said = []
    prepare(tok, rows, rows[:1], Limits(10_000, max_turns=1), log=said.append)
    assert min_turns(rows[0]) == 2
    assert any(line.startswith("[pact_fast] 3 of 3 training tasks need more assistant turns than "
                               "rollout.max_turns=1 to be rewarded") for line in said), said
    assert any("1 of 1 held-out tasks" in line for line in said)
    said.clear()
    prepare(tok, rows, rows[:1], Limits(10_000, max_turns=2), log=said.append)
    assert not any("to be rewarded" in line for line in said)
    # a BFCL-style row: two user turns, the first answered with a call, the second without
    bfcl = replace(rows[0], env={"name": "bfcl", "user_turns": [[{"role": "user", "content": "and then ?"}]]},
                   trace=[{"role": "assistant", "content": "", "tool_calls": rows[0].trace[0]["tool_calls"]},
                          {"role": "tool", "tool_call_id": "c", "content": "x"},
                          {"role": "assistant", "content": "done"},
                          {"role": "user", "content": "and then ?"},
                          {"role": "assistant", "content": "ok"}])
    assert min_turns(bfcl) == 3


def _calling_row(arguments):
    """A row whose trace makes one call of ``post`` with ``arguments`` (BFCL-like values) and then answers."""
    tool = {"type": "function", "function": {"name": "post", "description": "posts", "parameters": {
        "type": "object", "properties": {k: {} for k in arguments}, "required": list(arguments)}}}
    return {"id": "r", "messages": [{"role": "user", "content": "Post it."}], "tools": [tool],
            "trace": [{"role": "assistant", "reasoning_content": "I post it.", "content": "",
                       "tool_calls": [{"id": "c1", "type": "function",
                                       "function": {"name": "post", "arguments": arguments}}]},
                      {"role": "tool", "tool_call_id": "c1", "content": "done"},
                      {"role": "assistant", "content": "done"}],
            "answer": "done", "env": {}}


@pytest.mark.parametrize("arguments, read_back", [
    ({"tags": ["#a", "#b"]}, "an error"),  # the comma between list items splits the arguments
    ({"tags": ["#a"]}, '"tags": "[\'#a\']"'),  # a list read back as its text
    ({"all": True}, '"all": "True"'),  # a boolean as the word True
    ({"code": "7"}, '"code": 7'),  # a digit string as a number
    ({"text": "hi, you"}, "an error"),
])
def test_trace_calls_that_do_not_read_back_are_refused(smollm2_dir, tmp_path, arguments, read_back):
    """The compact format writes values as bare text: a trace call with a list, a boolean, a digit string or a
    comma inside a value reads back, from the tokens its SFT term trains on, as another call (63 of the 344 gold
    calls of 60 BFCL multi_turn_base tasks). Refused naming the row, unless the format is one that carries JSON;
    skipped and counted with on_error=skip."""
    from transformers import AutoTokenizer

    from pact_fast.chat import resolve_chat_template

    path = _write(tmp_path / "d.jsonl", [_calling_row(arguments)])
    examples, _ = load_examples(path)
    tokenizers = {}
    for fmt in ("compact", "hermes"):
        tokenizers[fmt] = AutoTokenizer.from_pretrained(smollm2_dir)
        resolve_chat_template(tokenizers[fmt], "builtin", fmt, log=None)
    assert prepare(tokenizers["hermes"], examples, [], Limits(10_000), tool_call_format="hermes") == (examples, [])
    with pytest.raises(DataFormatError) as info:
        prepare(tokenizers["compact"], examples, [], Limits(10_000), tool_call_format="compact")
    message = str(info.value)
    assert message.startswith(f"{path}:1 (id 'r'): assistant turn 0's tool calls, rendered and read back in "
                              "rollout.tool_call_format='compact', are ")
    assert read_back in message and "use rollout.tool_call_format=hermes" in message and "\n" not in message
    lines = []
    with pytest.raises(DataFormatError, match="no training row fits a step"):
        prepare(tokenizers["compact"], examples, [], Limits(10_000), tool_call_format="compact", on_error="skip",
                log=lines.append)
    assert "assistant turn 0's tool calls" in lines[0]


def test_a_trace_call_is_read_back_under_the_runs_rollout_max_call_chars(smollm2_dir, tmp_path):
    """A trace call longer than 10,000 characters read back as an error (the parser's own cap) however far
    rollout.max_call_chars was raised: the row was refused as a call the rollout runs differently."""
    from transformers import AutoTokenizer

    from pact_fast.chat import resolve_chat_template

    examples, _ = load_examples(_write(tmp_path / "d.jsonl", [_calling_row({"text": "long " * 3000})]))
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    resolve_chat_template(tok, "builtin", "hermes", log=None)
    assert prepare(tok, examples, [], Limits(100_000, max_call_chars=20_000), tool_call_format="hermes") == (
        examples, [])
    with pytest.raises(DataFormatError, match=r"are an error \(tool call has 150\d\d characters, more than the limit "
                                              r"of 10000\)"):
        prepare(tok, examples, [], Limits(100_000), tool_call_format="hermes")


def test_a_trace_past_what_a_rollout_runs_or_hands_over_is_refused(smollm2_dir, tmp_path):
    """A trace turn of three parallel calls under rollout.max_calls_per_turn=2 trained the third call, which every
    episode imitating it got answered "not run", and a response longer than rollout.max_result_chars trained an
    answer from text no episode gets (an environment of your own replays no trace at load)."""
    from transformers import AutoTokenizer

    from pact_fast.chat import resolve_chat_template

    row = _calling_row({"text": "hi"})
    calls = [{**row["trace"][0]["tool_calls"][0], "id": f"c{k}"} for k in (1, 2, 3)]
    row["trace"][:2] = [{**row["trace"][0], "tool_calls": calls}] + [
        {"role": "tool", "tool_call_id": c["id"], "content": "done"} for c in calls]
    examples, _ = load_examples(_write(tmp_path / "d.jsonl", [row]))
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    resolve_chat_template(tok, "builtin", "hermes", log=None)
    assert prepare(tok, examples, [], Limits(10_000, max_calls_per_turn=3), tool_call_format="hermes") == (
        examples, [])
    with pytest.raises(DataFormatError, match=r"d.jsonl:1 \(id 'r'\): assistant turn 0 makes 3 tool calls, more than "
                                              r"the rollout.max_calls_per_turn=2 a rollout runs in one turn"):
        prepare(tok, examples, [], Limits(10_000, max_calls_per_turn=2), tool_call_format="hermes")
    # a response longer than a rollout hands over: every episode imitating the call got an error in its place
    with pytest.raises(DataFormatError, match=r"d.jsonl:1 \(id 'r'\): trace\[1\], a tool response, has 4 characters, "
                                              r"more than the rollout.max_result_chars=3 a rollout hands over"):
        prepare(tok, examples, [], Limits(10_000, max_result_chars=3), tool_call_format="hermes")


def test_compact_values_that_read_back_pass(smollm2_dir, tmp_path):
    """What the compact format does carry is not refused: words, numbers, an id with leading zeros, inner spaces."""
    from transformers import AutoTokenizer

    from pact_fast.chat import resolve_chat_template

    built_in = make_tasks(64, seed=0, world_seed=0, hops=(1, 2, 3), ops=True)  # add ( a = 48 , b = 5 ) among them
    assert any(c["function"]["name"] == "add" for r in built_in for m in r["trace"] for c in m.get("tool_calls", []))
    rows = [_calling_row({"name": "Maya  Lopez", "n": 12, "neg": -5, "id": "007"}), *built_in]
    rows[0]["id"] = "calls"
    examples, _ = load_examples(_write(tmp_path / "d.jsonl", rows))
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    resolve_chat_template(tok, "builtin", "compact", log=None)
    assert prepare(tok, examples, [], Limits(10_000), tool_call_format="compact") == (examples, [])
    builtin = build_tokenizer()  # the built-in tokenizer splits digits ("1 2") and signs ("- 5")
    assert prepare(builtin, examples[1:], [], Limits(10_000), tool_call_format="compact") == (examples[1:], [])


def test_build_checks_trace_calls_in_the_runs_tool_call_format(tmp_path):
    """trainer.build hands prepare the run's rollout.tool_call_format: a trace call with a digit string argument is
    refused before any step in the (default) compact format, which writes it as a number."""
    rows = make_tasks(64, seed=0, world_seed=0, hops=(1, 2, 3), ops=True)
    k = next(i for i, r in enumerate(rows) if any(c["function"]["name"] == "add" for m in r["trace"]
                                                  for c in m.get("tool_calls", [])))
    rows = rows[k - 3:k + 3] if k >= 3 else rows[:6]
    k = min(k, 3)
    call = next(c["function"] for m in rows[k]["trace"] for c in m.get("tool_calls", []) if c["function"]["name"] == "add")
    call["arguments"]["a"] = str(call["arguments"]["a"])  # the environment adds "48" as 48; compact reads back 48
    data = _write(tmp_path / "data.jsonl", rows)
    cfg = load_config(None, tiny_for(data_path=True) + [f"data.path={data}", f"train.out_dir={tmp_path / 'run'}"])
    with pytest.raises(DataFormatError, match=rf"^{data}:{k + 1} \(id '{rows[k]['id']}'\): assistant turn \d's tool "
                                              r"calls, rendered and read back in rollout.tool_call_format='compact'"):
        build(cfg, log=lambda *_: None)
    assert not (tmp_path / "run").exists()


def test_text_the_built_in_tokenizer_cannot_read_is_refused(tiny):
    """The built-in model's word tokenizer knows only its tasks' words: other data trained on <|unk|> pieces
    (a call to <|unk|> ( <|unk|> = <|unk|> )) without a word. Held-out prompts too."""
    _, tok = tiny
    rows = _rows(4)
    rows[1]["messages"][-1]["content"] += " Tokyo 東京"
    train = load_examples_from(rows)
    with pytest.raises(DataFormatError, match=rf"task {rows[1]['id']!r}: its prompt or trace has 2 piece\(s\) of text "
                                              r"the tokenizer reads as '<\|unk\|>'.*--model DIR"):
        prepare(tok, train, [], Limits(10_000))
    with pytest.raises(DataFormatError, match=rf"task {rows[1]['id']!r}: its prompt has 2 piece"):
        prepare(tok, train[:1], train[1:2], Limits(10_000))


def test_expert_turns_longer_than_a_rollout_turn_are_said(tiny):
    _, tok = tiny
    rows = _rows(4)
    _long_reasoning(rows[2], 60)  # the built-in tasks' turns take at most 37 tokens, within the default 48
    train = load_examples_from(rows)
    lines = []
    prepare(tok, train, [], Limits(10_000, max_new_tokens=48), log=lines.append)
    assert len(lines) == 1 and lines[0].startswith(
        f"[pact_fast] 1 of 4 training tasks have an expert turn longer than rollout.max_new_tokens=48 (first: task "
        f"{rows[2]['id']!r}, "), lines
    assert task_inputs.longest_turn(group_inputs(tok, train[2]).sft) > 60
    lines.clear()
    prepare(tok, train, [], Limits(10_000, max_new_tokens=1000), log=lines.append)
    assert lines == []


def test_a_row_the_template_cannot_render_is_named(tiny):
    _, tok = tiny
    train = load_examples_from(_rows(2))
    original = tok.chat_template
    tok.chat_template = "{% for m in messages %}{{ m.content.upper() }}{{ m.nothing.deeper }}{% endfor %}"
    try:
        with pytest.raises(DataFormatError, match=rf"task {train[0].id!r}: the chat template cannot render it "
                                                  r"\(UndefinedError: "):
            prepare(tok, train, [], Limits(10_000))
    finally:
        tok.chat_template = original


def test_text_holding_a_special_token_is_refused(tiny):
    """A tool result with `<|im_end|>\\n<|im_start|>assistant` in it was tokenised as control tokens: a fake turn
    inside the context."""
    _, tok = tiny
    rows = _rows(3)
    k = next(i for i, m in enumerate(rows[1]["trace"]) if m["role"] == "tool")
    rows[1]["trace"][k]["content"] += " <|im_end|>"
    with pytest.raises(DataFormatError, match=rf"task {rows[1]['id']!r}: trace\[{k}\]\.content holds '<\|im_end\|>', "
                                              "a special token of the tokenizer"):
        prepare(tok, load_examples_from(rows), [], Limits(10_000))


@pytest.mark.parametrize("name, required", [("get-weather", ["city"]), ("math.sqrt", ["x"]), ("share", ["max-n"])])
def test_a_tool_the_compact_format_cannot_call_is_refused_held_out_too(smollm2_dir, tmp_path, name, required):
    """The compact format writes a tool's name and its arguments' names as bare words: a task offering `get-weather`
    (or a required `max-n`) had every call of it fail; only a trace call of it read back wrong, so a held-out task
    (or grpo's, without a trace) was evaluated, and trained on, without a word."""
    from transformers import AutoTokenizer

    from pact_fast.chat import resolve_chat_template

    row = _calling_row({"text": "hi"})
    row["tools"].append({"type": "function", "function": {"name": name, "description": "d", "parameters": {
        "type": "object", "properties": {k: {} for k in required}, "required": required}}})
    held_out, _ = load_examples(_write(tmp_path / "d.jsonl", [row]))
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    resolve_chat_template(tok, "builtin", "compact", log=None)
    with pytest.raises(DataFormatError, match=rf"\(id 'r'\): its tool {name!r}, with its required arguments "
                                              rf"\[{required[0]!r}\], cannot be called in rollout.tool_call_format="
                                              "compact, which writes names as letters, digits and _"):
        prepare(tok, [], held_out, Limits(10_000), tool_call_format="compact")
    resolve_chat_template(tok, "builtin", "hermes", log=None)
    assert prepare(tok, [], held_out, Limits(10_000), tool_call_format="hermes") == ([], held_out)
