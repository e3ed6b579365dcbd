"""The vLLM rollout engine (pact_fast.rollout_vllm) and the truncated importance sampling it turns on.

The first tests need no vLLM: the TIS weights against a hand computation, the config's refusals, the HF engine
with TIS on (its behaviour log-probs are the trainer's: no mismatch), the one-line error without vLLM. The
rest start vLLM's CPU engine on SmolLM2-135M-Instruct (float32, 1 GiB of KV cache) and are skipped, with the
reason, where vLLM cannot be imported: it pins transformers < 5.20, so it lives in its own virtualenv
(README, "Rollouts with vLLM"; .ci/run runs this file there)."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from pact_fast.config import ConfigError, load_config
from pact_fast.losses import truncated_importance_weights
from pact_fast.rollout import HFRolloutEngine, RolloutConfig
from pact_fast.rollout_vllm import PROBE_ATOL, RolloutEngineError, import_vllm, is_cap, make_rollout_engine

try:
    import_vllm()
    VLLM_REASON = None
except RolloutEngineError as exc:
    VLLM_REASON = str(exc)
needs_vllm = pytest.mark.skipif(VLLM_REASON is not None, reason=f"vLLM unusable here: {VLLM_REASON}")


# ---------------------------------------------------------------- without vLLM


def test_truncated_importance_weights_against_a_hand_computation():
    logp = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-3.0, -0.1, 0.0, 0.0]])
    behavior = torch.tensor([[-1.5, -1.0, -2.0, 0.0], [-3.0, -0.4, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    weights, metrics = truncated_importance_weights(logp, behavior, mask, cap=2.0)
    expected = torch.tensor([[math.exp(0.5), math.exp(-1.0), 2.0, 0.0], [1.0, math.exp(0.3), 0.0, 0.0]])
    torch.testing.assert_close(weights, expected, rtol=1e-6, atol=1e-7)
    diffs = [0.5, 1.0, 1.5, 0.0, 0.3]
    assert metrics["rollout/logp_mismatch_mean"] == pytest.approx(sum(diffs) / 5)
    assert metrics["rollout/logp_mismatch_max"] == pytest.approx(1.5)
    assert metrics["rollout/is_clipped_frac"] == pytest.approx(1 / 5)  # exp(1.5) > 2
    assert metrics["rollout/is_weight_mean"] == pytest.approx(float(expected.sum()) / 5)
    with pytest.raises(ValueError, match="cap=0.5 must be >= 1"):
        truncated_importance_weights(logp, behavior, mask, cap=0.5)
    with pytest.raises(ValueError, match="NaN or inf on a sampled token"):
        truncated_importance_weights(logp, behavior.index_put((torch.tensor([0]), torch.tensor([1])),
                                                              torch.tensor(float("nan"))), mask, cap=2.0)


@pytest.mark.parametrize("override, message", [
    ("rollout.engine=sglang", "rollout.engine='sglang' is not valid; choose one of \\['hf', 'vllm'\\]"),
    ("rollout.vllm_kv_cache_gb=2", "rollout.vllm_kv_cache_gb applies to rollout.engine=vllm only"),
    ("rollout.vllm_dtype=bfloat16", "rollout.vllm_dtype applies to rollout.engine=vllm only"),
    ("rollout.is_cap=0.5", "rollout.is_cap=0.5 must be >= 1"),
], ids=["unknown-engine", "kv-with-hf", "dtype-with-hf", "cap-below-1"])
def test_config_refusals(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


@pytest.mark.parametrize("override, message", [
    ("rollout.vllm_kv_cache_gb=-1", "vllm_kv_cache_gb=-1.0 must be >= 0"),
    ("rollout.vllm_gpu_memory_utilization=1.5", "vllm_gpu_memory_utilization=1.5 must lie in \\(0, 1\\]"),
    ("rollout.vllm_tensor_parallel_size=0", "vllm_tensor_parallel_size=0 must be >= 1"),
    ("rollout.vllm_max_model_len=0", "vllm_max_model_len=0 must be >= 1"),
], ids=["kv-negative", "utilization", "tp", "max-len"])
def test_vllm_option_refusals(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=["rollout.engine=vllm", override])


def test_is_cap_defaults_on_for_vllm_only():
    assert is_cap(RolloutConfig()) == 0.0
    assert is_cap(RolloutConfig(engine="vllm")) == 2.0
    assert is_cap(RolloutConfig(engine="vllm", is_cap=0)) == 0.0
    assert is_cap(RolloutConfig(is_cap=3)) == 3.0
    assert isinstance(make_rollout_engine(None, _Tok(), RolloutConfig(), seed=0), HFRolloutEngine)


class _Tok:
    eos_token = "</s>"

    def convert_tokens_to_ids(self, token):
        return 0


def test_without_vllm_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(RolloutEngineError, match=r"vLLM is not importable.*pip install -e \"\.\[vllm\]\""):
        import_vllm()
    with pytest.raises(RolloutEngineError, match="not importable"):
        make_rollout_engine(torch.nn.Linear(1, 1), _Tok(), RolloutConfig(engine="vllm"), seed=0)


def test_pact_fast_train_without_vllm_fails_in_one_line(tmp_path):
    """The command, with vLLM made unimportable (``sys.modules['vllm'] = None``): status 2, one line naming the
    extra, before any step."""
    code = ("import sys; sys.modules['vllm'] = None; from pact_fast.cli import main; "
            f"sys.exit(main(['train', '--out', {str(tmp_path)!r}, 'rollout.engine=vllm', 'train.steps=1', "
            "'data.train_tasks=4', 'data.eval_tasks=1', 'train.progress=false']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("pact-fast:")]
    assert len(lines) == 1 and 'pip install -e ".[vllm]"' in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_hf_engine_with_tis_logs_no_mismatch_and_trains(tmp_path):
    """TIS wired into the step: with the HF engine the behaviour log-probs are the trainer's, so every weight is 1."""
    from pact_fast.trainer import train

    config = load_config(overrides=["train.steps=2", "train.prompts_per_step=2", "rollout.group_size=2",
                                    "rollout.is_cap=2", "train.progress=false", "train.eval_every=0",
                                    "data.eval_tasks=1", "train.save_every=0", f"train.out_dir={tmp_path}"])
    train(config, log=lambda *a: None)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "rollout/logp_mismatch_max" in r]
    assert len(steps) == 2
    for r in steps:
        assert r["rollout/logp_mismatch_max"] < 1e-4 and r["rollout/is_clipped_frac"] == 0.0
        assert r["rollout/is_weight_mean"] == pytest.approx(1.0, abs=1e-4)
        assert math.isfinite(r["loss/total"])


# ---------------------------------------------------------------- with vLLM's CPU engine


def _examples(n):
    from pact_fast.data import parse_example
    from pact_fast.envs import make_tasks

    return [parse_example(t) for t in make_tasks(n, seed=3, hops=(1,), ops=False)]


@pytest.fixture(scope="module")
def smollm2_engine(smollm2_dir):
    from pact_fast.config import Config
    from pact_fast.models import load_pretrained
    from pact_fast.rollout_vllm import VLLMRolloutEngine
    from pact_fast.model_setup import fit_chat_template

    model, tokenizer = load_pretrained(smollm2_dir)
    config = Config()
    config.model.path = str(smollm2_dir)
    cfg = RolloutConfig(engine="vllm", group_size=2, max_new_tokens=24, max_turns=2, vllm_max_model_len=2048)
    fit_chat_template(config, tokenizer, _examples(2), log=None)
    engine = VLLMRolloutEngine(model, tokenizer, cfg, seed=0)
    yield engine
    engine.close()


def _make_env(example):
    from pact_fast.envs.multihop import MultiHopEnv

    return MultiHopEnv(example)


@needs_vllm
def test_greedy_episodes_match_the_hf_engine(smollm2_engine):
    engine = smollm2_engine
    hf = HFRolloutEngine(engine.model, engine.tokenizer, engine.config, seed=0)
    examples = _examples(2)
    ours = [ep for eps in engine.rollout(examples, _make_env, group_size=1, greedy=True) for ep in eps]
    theirs = [ep for eps in hf.rollout(examples, _make_env, group_size=1, greedy=True) for ep in eps]
    for a, b in zip(ours, theirs):
        assert a.response_ids == b.response_ids and a.response_mask == b.response_mask
        assert (a.finish, a.turns, a.tool_calls, a.reward) == (b.finish, b.turns, b.tool_calls, b.reward)
        sampled = [i for i, m in enumerate(a.response_mask) if m]
        diff = max(abs(a.behavior_logp[i] - b.behavior_logp[i]) for i in sampled)
        assert diff < 1e-3, f"fp32 greedy log-probs differ by {diff}"
    assert sum(ep.num_model_tokens for ep in ours) > 10


@needs_vllm
def test_sampling_is_seeded_and_stops_at_the_cap_or_end_of_turn(smollm2_engine):
    engine = smollm2_engine
    examples = _examples(1)
    engine.generator.manual_seed(7)
    first = engine.rollout(examples, _make_env, group_size=3)[0]
    engine.generator.manual_seed(7)
    again = engine.rollout(examples, _make_env, group_size=3)[0]
    assert [ep.response_ids for ep in first] == [ep.response_ids for ep in again]
    assert len({tuple(ep.response_ids) for ep in first}) > 1, "each request gets its own seed"
    for ep in first:
        turn = ep.response_ids[:ep.response_mask.index(0)] if 0 in ep.response_mask else ep.response_ids
        assert len(turn) <= engine.config.max_new_tokens
        assert (turn[-1] == engine.eos) == (ep.finish != "length")
        assert all(lp <= 0 for lp in ep.behavior_logp)


@needs_vllm
def test_weight_sync_then_greedy_logprobs_match_the_trainer(smollm2_engine):
    engine = smollm2_engine
    model = engine.model
    syncs = engine.syncs
    torch.manual_seed(0)
    with torch.no_grad():  # an update of every parameter, the tied embedding included (a few optimizer steps)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 2e-3)
    with pytest.raises(RolloutEngineError, match="does not hold the trained weights"):
        engine.check_fingerprint()  # the engine still holds the old weights: the fingerprint sees it
    eps = engine.rollout(_examples(1), _make_env, group_size=1, greedy=True)[0]
    assert engine.syncs == syncs + 1 and engine.last_probe_error < PROBE_ATOL[torch.float32]
    ep = eps[0]
    first_turn = ep.response_ids[:ep.response_mask.index(0)] if 0 in ep.response_mask else ep.response_ids
    ids = ep.prompt_ids + first_turn
    trainer = engine.trainer_logprobs(ids)[len(ep.prompt_ids) - 1:]
    engine_lp = torch.tensor(ep.behavior_logp[:len(first_turn)])
    assert (trainer - engine_lp).abs().max() < 1e-3
    assert engine.rollout(_examples(1), _make_env, group_size=1, greedy=True) and engine.syncs == syncs + 1, \
        "no push while the weights are unchanged"


@needs_vllm
def test_a_killed_engine_process_is_an_error_with_a_message(smollm2_engine):
    import psutil

    engine = smollm2_engine
    children = psutil.Process().children(recursive=True)
    core = [p for p in children if "EngineCore" in " ".join(p.cmdline()) + p.name()]
    assert core, f"no EngineCore process among {[p.name() for p in children]}"
    for p in core:
        os.kill(p.pid, signal.SIGKILL)
    time.sleep(2)
    with pytest.raises(RolloutEngineError, match="vLLM engine"):
        engine.rollout(_examples(1), _make_env, group_size=1)


@needs_vllm
def test_pact_fast_train_with_the_vllm_engine(smollm2_dir, tmp_path):
    cmd = [sys.executable, "-m", "pact_fast", "train", "--model", str(smollm2_dir), "--out", str(tmp_path),
           "rollout.engine=vllm", "rollout.vllm_max_model_len=2048", "train.steps=3", "train.prompts_per_step=1",
           "rollout.group_size=2", "rollout.max_new_tokens=16", "rollout.max_turns=1", "data.train_tasks=4",
           "data.eval_tasks=1", "train.eval_every=0", "train.progress=false", "train.save_every=0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss/total" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert math.isfinite(r["loss/total"]) and r["skipped_step"] == 0.0
        assert 0 <= r["rollout/logp_mismatch_mean"] <= r["rollout/logp_mismatch_max"] < 1.0
        assert 0 <= r["rollout/is_clipped_frac"] <= 1
