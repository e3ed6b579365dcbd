"""The vLLM rollout engine (pact_fast.rollout_vllm) and the truncated importance sampling it turns on.

The first tests need no vLLM: the TIS weights against a hand computation, the config's refusals, the HF engine
with TIS on (its behaviour log-probs are the trainer's: no mismatch), the one-line error without vLLM, and sleep
mode's call order on a recording stand-in for ``vllm.LLM`` (vLLM's CPU build has no sleep mode). The rest start
vLLM's CPU engine on SmolLM2-135M-Instruct (float32, 1 GiB of KV cache; two engines of 0.25 GiB under torchrun,
tests/vllm_fsdp_worker.py) or check signatures of the installed vLLM, and are skipped, with the reason, where
vLLM cannot be imported: it pins transformers < 5.20, so it lives in its own virtualenv (README, "Rollouts
with vLLM"; .ci/run runs this file there)."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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
    ("rollout.vllm_sleep=false", "rollout.vllm_sleep applies to rollout.engine=vllm only"),
    ("rollout.is_cap=0.5", "rollout.is_cap=0.5 must be >= 1"),
], ids=["unknown-engine", "kv-with-hf", "dtype-with-hf", "sleep-with-hf", "cap-below-1"])
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


class _FakeLLM:
    """A stand-in for ``vllm.LLM`` that records every call (name, args, kwargs) into ``calls``: it loads the
    starting checkpoint and the pushed weights into a model of its own (so the probe compares real log-probs),
    answers every turn with the end-of-turn token, and has ``sleep`` / ``wake_up``."""

    calls = []

    def __init__(self, model, **kwargs):
        from transformers import AutoModelForCausalLM

        self.calls.append(("__init__", (), kwargs))
        self.model = AutoModelForCausalLM.from_pretrained(model).eval()
        self.eos = self.model.config.eos_token_id
        params = dict(self.model.named_parameters())

        class Worker:
            model_runner = type("Runner", (), {"get_model": staticmethod(lambda: self.model)})

            @staticmethod
            @torch.no_grad()
            def reload_weights(weights_iterator):
                for name, tensor in weights_iterator:
                    params[name].copy_(tensor)

        self.worker = Worker()

    def collective_rpc(self, fn):
        self.calls.append(("collective_rpc", (), {}))
        return [fn(self.worker)]

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache", (), {}))

    def sleep(self, *args, **kwargs):
        self.calls.append(("sleep", args, kwargs))

    def wake_up(self, *args, **kwargs):
        self.calls.append(("wake_up", args, kwargs))

    @torch.no_grad()
    def generate(self, prompts, params, use_tqdm=False):
        from types import SimpleNamespace as NS

        if not isinstance(params, list):  # the probe: prompt log-probs of its one sequence
            self.calls.append(("generate(probe)", (), {}))
            ids = prompts[0]["prompt_token_ids"]
            logp = torch.log_softmax(self.model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)
            lps = logp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
            return [NS(prompt_logprobs=[None] + [{t: NS(logprob=lp)} for t, lp in zip(ids[1:], lps)])]
        self.calls.append(("generate", (), {}))
        return [NS(outputs=[NS(token_ids=[self.eos], logprobs=[{self.eos: NS(logprob=-0.5)}])]) for _ in prompts]


def _fake_engine(monkeypatch, vllm_sleep, cuda=True):
    """A ``VLLMRolloutEngine`` on ``_FakeLLM`` and the built-in tiny model, made as on a machine with CUDA or
    without (the config check and the sleep default look at ``torch.cuda.is_available``)."""
    from types import SimpleNamespace as NS

    from pact_fast.config import Config
    from pact_fast.model_setup import build_policy, fit_chat_template
    from pact_fast import rollout_vllm

    config = Config()
    policy = build_policy(config.model, torch.device("cpu"), 0)
    fit_chat_template(config, policy.tokenizer, _examples(2), log=None)
    _FakeLLM.calls = []
    monkeypatch.setattr(rollout_vllm, "import_vllm", lambda: (_FakeLLM, lambda **kw: NS(**kw)))
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: cuda)
        cfg = RolloutConfig(engine="vllm", group_size=1, max_turns=1, vllm_dtype="float32", vllm_sleep=vllm_sleep)
        engine = rollout_vllm.VLLMRolloutEngine(policy.model, policy.tokenizer, cfg, seed=0)
    return engine


def _update(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-2)


def _sleep_calls(monkeypatch):
    """The recorded calls of three rollouts with sleep mode on: the first, one with unchanged weights, one after
    an update (``[(name, args, kwargs)]`` per rollout), and the engine."""
    engine = _fake_engine(monkeypatch, vllm_sleep=None)  # None: on, as on CUDA
    assert engine.sleep and _FakeLLM.calls[0][2]["enable_sleep_mode"] is True
    per_rollout = []
    for change in (False, False, True):
        if change:
            _update(engine.model)
        _FakeLLM.calls = []
        engine.rollout(_examples(1), _make_env)
        per_rollout.append(list(_FakeLLM.calls))
    return per_rollout, engine


def test_sleep_mode_sleeps_after_rollouts_and_wakes_weights_then_kv_cache_around_the_sync(monkeypatch):
    per_rollout, engine = _sleep_calls(monkeypatch)
    names = [[name if name != "wake_up" else f"wake_up{kw['tags']}" for name, _, kw in calls]
             for calls in per_rollout]
    assert names[0] == ["generate(probe)", "generate", "sleep"]  # starting weights, probe picked, no push
    woken = ["wake_up['weights']", "collective_rpc", "wake_up['kv_cache']", "reset_prefix_cache", "generate(probe)",
             "generate", "sleep"]
    assert names[1] == woken, "after a sleep the weights are pushed even when unchanged (level 2 dropped them)"
    assert names[2] == woken
    assert all(kw == {"level": 2} for calls in per_rollout for name, _, kw in calls if name == "sleep")
    assert engine.syncs == 2 and engine.last_probe_error < 1e-4  # the engine holds the updated weights


@pytest.mark.parametrize("vllm_sleep, cuda", [(False, True), (None, False)], ids=["off-on-cuda", "unset-on-cpu"])
def test_without_sleep_mode_nothing_sleeps_or_wakes(monkeypatch, vllm_sleep, cuda):
    engine = _fake_engine(monkeypatch, vllm_sleep=vllm_sleep, cuda=cuda)
    assert not engine.sleep and _FakeLLM.calls[0][2]["enable_sleep_mode"] is False
    for change in (False, True):
        if change:
            _update(engine.model)
        engine.rollout(_examples(1), _make_env)
    names = [name for name, _, _ in _FakeLLM.calls]
    assert "sleep" not in names and "wake_up" not in names
    # the parameter check at start, then one push: the update's
    assert names.count("collective_rpc") == 2 and engine.last_probe_error < 1e-4


def test_a_rollout_renders_each_prompt_once(monkeypatch):
    """The engine's length check and the episodes start from the same rendered prompts: ``prepare`` rendered every
    prompt again, a chat template run per prompt per step for nothing."""
    from pact_fast import chat, rollout

    engine = _fake_engine(monkeypatch, vllm_sleep=False)
    renders, original = [], chat.prompt_ids

    def counting(tokenizer, example, **kwargs):
        renders.append(example.id)
        return original(tokenizer, example, **kwargs)

    monkeypatch.setattr(rollout, "prompt_ids", counting)
    monkeypatch.setattr(chat, "prompt_ids", counting)
    examples = _examples(2)
    for _ in range(2):  # the first rollout also picks the probe
        renders.clear()
        episodes = engine.rollout(examples, _make_env, group_size=2)
        assert sorted(renders) == sorted(ex.id for ex in examples)
        assert [ep.prompt_ids for ep in episodes[0]] == [list(original(engine.tokenizer, examples[0]))] * 2


def test_sleep_mode_default_follows_cuda(monkeypatch):
    from pact_fast.rollout_vllm import vllm_sleep

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert vllm_sleep(RolloutConfig(engine="vllm")) is False
    assert vllm_sleep(RolloutConfig(engine="vllm", vllm_sleep=False)) is False
    with pytest.raises(ValueError, match="rollout.vllm_sleep=true needs the engine on a CUDA GPU"):
        RolloutConfig(engine="vllm", vllm_sleep=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert vllm_sleep(RolloutConfig(engine="vllm")) is True
    assert vllm_sleep(RolloutConfig(engine="vllm", vllm_sleep=False)) is False


def test_under_torchrun_the_engine_process_sees_no_torchrun_variables_and_only_the_ranks_gpu(monkeypatch):
    """What the engine's process inherits under torchrun (``engine_process_env``), as on local rank 1 of a node
    whose visible GPUs are 4-7: no RANK / MASTER_PORT / ..., CUDA_VISIBLE_DEVICES the rank's GPU; the trainer's
    environment back afterwards."""
    from pact_fast import rollout_vllm

    monkeypatch.setattr(rollout_vllm.dist, "is_distributed", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    torchrun = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
                "CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    for key, value in torchrun.items():
        monkeypatch.setenv(key, value)
    with rollout_vllm.engine_process_env():
        inside = {key: os.environ.get(key) for key in torchrun}
    assert inside == {"RANK": None, "LOCAL_RANK": None, "WORLD_SIZE": None, "MASTER_ADDR": None, "MASTER_PORT": None,
                      "CUDA_VISIBLE_DEVICES": "5"}
    assert {key: os.environ.get(key) for key in torchrun} == torchrun


def test_tensor_parallel_engines_under_torchrun_are_refused(monkeypatch):
    from types import SimpleNamespace as NS

    from pact_fast import rollout_vllm

    monkeypatch.setattr(rollout_vllm, "import_vllm", lambda: (_FakeLLM, lambda **kw: NS(**kw)))
    monkeypatch.setattr(rollout_vllm.dist, "is_distributed", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = RolloutConfig(engine="vllm", vllm_tensor_parallel_size=2)
    with pytest.raises(RolloutEngineError, match="vllm_tensor_parallel_size=2 under torchrun is not implemented"):
        rollout_vllm.VLLMRolloutEngine(torch.nn.Linear(1, 1), _Tok(), cfg, seed=0)


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
def test_the_kv_cache_is_the_options_size_whatever_vllm_cpu_kvcache_space_says(monkeypatch, smollm2_dir):
    """vLLM's CPU platform takes ``VLLM_CPU_KVCACHE_SPACE`` (GiB) over ``kv_cache_memory_bytes``: exported, it
    silently replaced ``rollout.vllm_kv_cache_gb``. vLLM's own config, built in the environment the engine starts
    in (``engine_process_env``), keeps the option's size."""
    from vllm.engine.arg_utils import EngineArgs

    from pact_fast.rollout_vllm import engine_process_env

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")
    with engine_process_env():
        config = EngineArgs(model=str(smollm2_dir), skip_tokenizer_init=True, dtype="float32", max_model_len=512,
                            kv_cache_memory_bytes=2 ** 28).create_engine_config()
    assert config.cache_config.kv_cache_memory_bytes == 2 ** 28
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "3", "the trainer's environment is left as it was"


@needs_vllm
def test_the_real_llm_accepts_the_sleep_and_wake_arguments_the_engine_passes(monkeypatch):
    """vLLM's own ``LLM.sleep`` / ``LLM.wake_up`` signatures bind every call the engine made to the fake, and
    ``enable_sleep_mode`` is an engine argument (``LLM(**kwargs)`` hands it to ``EngineArgs``)."""
    import dataclasses
    import inspect

    from vllm import LLM
    from vllm.engine.arg_utils import EngineArgs

    per_rollout, _ = _sleep_calls(monkeypatch)
    made = [(name, args, kw) for calls in per_rollout for name, args, kw in calls if name in ("sleep", "wake_up")]
    assert {name for name, _, _ in made} == {"sleep", "wake_up"}
    for name, args, kw in made:
        inspect.signature(getattr(LLM, name)).bind(object(), *args, **kw)  # TypeError on an unknown argument
    assert "tags" in inspect.signature(LLM.wake_up).parameters and "level" in inspect.signature(LLM.sleep).parameters
    assert "enable_sleep_mode" in {f.name for f in dataclasses.fields(EngineArgs)}


@pytest.mark.skipif(torch.cuda.is_available(), reason="sleep mode is refused only where there is no CUDA")
def test_asking_for_sleep_mode_on_cpu_fails_before_any_step(tmp_path):
    cmd = [sys.executable, "-m", "pact_fast", "train", "--out", str(tmp_path), "rollout.engine=vllm",
           "rollout.vllm_sleep=true", "train.steps=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("pact-fast:")]
    assert proc.returncode == 2 and len(lines) == 1 and "vllm_sleep=true needs the engine on a CUDA GPU" in lines[0]
    assert not (tmp_path / "metrics.jsonl").exists()


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
def test_episodes_stop_within_the_engines_max_model_len(smollm2_engine):
    """Each request asks for at most the positions the engine's max_model_len leaves (vLLM refused a context at the
    limit, and the run stopped): an episode with none left ends as "length"."""
    from pact_fast.chat import prompt_ids

    engine = smollm2_engine
    assert engine.max_len == 2048  # rollout.vllm_max_model_len, under SmolLM2's 8192 positions
    examples = _examples(1)
    limit = len(prompt_ids(engine.tokenizer, examples[0])) + 5
    engine.max_len = limit
    try:
        episodes = engine.rollout(examples, _make_env, group_size=2)[0]
    finally:
        engine.max_len = 2048
    assert all(len(ep.prompt_ids) + len(ep.response_ids) <= limit for ep in episodes)
    assert any(ep.finish == "length" and len(ep.response_ids) == 5 for ep in episodes)


@needs_vllm
def test_a_prompt_longer_than_the_engines_max_model_len_is_refused_in_one_line(smollm2_engine):
    """With rollout.vllm_max_model_len under a prompt's length every episode of it ended as "length" with no token
    sampled (reward 0, nothing to learn from), step after step, without a word."""
    from pact_fast.chat import prompt_ids

    engine = smollm2_engine
    examples = _examples(1)
    prompt = len(prompt_ids(engine.tokenizer, examples[0]))
    engine.max_len = prompt - 1
    try:
        with pytest.raises(RolloutEngineError, match=f"a prompt of {prompt} tokens does not fit the engine's "
                                                     f"{prompt - 1} positions \\(rollout.vllm_max_model_len=2048"):
            engine.rollout(examples, _make_env, group_size=1)
    finally:
        engine.max_len = 2048


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
@pytest.mark.parametrize("temperature, top_p", [(1.0, 0.5), (0.7, 0.9)])
def test_behaviour_logprobs_are_the_trainers_at_the_temperature_before_top_p(smollm2_engine, temperature, top_p):
    """Sampled (top_p < 1) and greedy turns log ``log softmax(logits / T)`` of the token, before top-p truncation,
    as the HF engine does and the trainer scores: vLLM's own processed log-probs were renormalised over the nucleus
    (0.48-0.55 mean off at top_p=0.5) and its greedy ones at T = 1 (1.4 off at T=0.7)."""
    engine, model = smollm2_engine, smollm2_engine.model
    cfg = engine.config
    saved = cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.max_turns
    cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.max_turns = temperature, top_p, 12, 1
    try:
        episodes = [ep for greedy in (False, True)
                    for ep in engine.rollout(_examples(1), _make_env, group_size=2, greedy=greedy)[0]]
    finally:
        cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.max_turns = saved
    for ep in episodes:
        ids = ep.prompt_ids + ep.response_ids
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, len(ep.prompt_ids) - 1:-1].float()
        scored = torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(ep.response_ids)[:, None])[:, 0]
        diff = (scored - torch.tensor(ep.behavior_logp)).abs().max()
        assert diff < 1e-3, f"behaviour log-probs differ from the trainer's by up to {diff:.3g}"


@needs_vllm
def test_the_built_in_model_samples_through_the_engine():
    """The built-in tiny model (made with ``from_config``: no ``architectures`` in its config) was taken by vLLM for an
    embedding model, and the engine failed to start ("Tokenizer not available"). Its sampled turns now log the
    trainer's own log-probs."""
    from pact_fast.config import Config
    from pact_fast.model_setup import build_policy

    config = Config()
    policy = build_policy(config.model, torch.device("cpu"), 0)
    for ep in _built_in_episodes(config, policy):
        assert ep.response_ids and (_scored(policy.model, ep) - torch.tensor(ep.behavior_logp)).abs().max() < 1e-3


def _built_in_episodes(config, policy):
    """One built-in task's group of 2 episodes of up to 8 tokens, sampled by a vLLM engine of ``policy``."""
    from pact_fast.model_setup import fit_chat_template
    from pact_fast.rollout_vllm import VLLMRolloutEngine

    fit_chat_template(config, policy.tokenizer, _examples(1), log=None)
    cfg = RolloutConfig(engine="vllm", group_size=2, max_new_tokens=8, max_turns=1, vllm_max_model_len=1024,
                        vllm_kv_cache_gb=0.25)
    engine = VLLMRolloutEngine(policy.model, policy.tokenizer, cfg, seed=0)
    try:
        return engine.rollout(_examples(1), _make_env)[0]
    finally:
        engine.close()


def _scored(model, ep):
    """``model``'s log-probs [len(ep.response_ids)] of an episode's response, by its own forward."""
    ids = ep.prompt_ids + ep.response_ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, len(ep.prompt_ids) - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ep.response_ids)[:, None])[:, 0]


@needs_vllm
def test_a_lora_policy_samples_through_the_engine_with_its_adapters():
    """``model.lora`` with the vLLM engine: the engine holds the base with the adapters folded in, so its sampled
    turns log the adapted policy's log-probs (and not the base's)."""
    from pact_fast.model_setup import adapters_off, build_policy

    config = load_config(None, ["model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8"])
    policy = build_policy(config.model, torch.device("cpu"), 0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B = 0 at start: random adapters make the policy differ from the base
        for name, p in policy.model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    for ep in _built_in_episodes(config, policy):
        behaviour = torch.tensor(ep.behavior_logp)
        assert ep.response_ids and (_scored(policy.model, ep) - behaviour).abs().max() < 1e-3
        with adapters_off(policy.peft):
            assert (_scored(policy.model, ep) - behaviour).abs().max() > 1e-2, \
                "the engine samples the adapted policy, not the base"


@needs_vllm
def test_pact_fast_train_with_lora_and_the_vllm_engine(tmp_path):
    """Each update moves the adapters only; the engine is synced with them folded in before every rollout phase:
    the behaviour log-probs stay the trainer's at every step (float32)."""
    cmd = [sys.executable, "-m", "pact_fast", "train", "--out", str(tmp_path), "rollout.engine=vllm",
           "rollout.vllm_max_model_len=1024", "rollout.vllm_kv_cache_gb=0.25", "model.lora.enabled=true",
           "train.lr=0.05", "train.warmup_steps=0", "train.steps=3", "train.prompts_per_step=2",
           "rollout.group_size=2", "rollout.max_new_tokens=16", "rollout.max_turns=1", "data.train_tasks=8",
           "data.eval_tasks=1", "train.eval_every=0", "train.progress=false", "train.save_every=0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "loss/total" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert math.isfinite(r["loss/total"]) and r["skipped_step"] == 0.0 and r["grad_norm"] > 0
        assert 0 <= r["rollout/logp_mismatch_mean"] <= r["rollout/logp_mismatch_max"] < 1e-3


@needs_vllm
def test_a_parameter_vllms_model_has_no_place_for_is_refused_at_start():
    """A Qwen3 with ``attention_bias=True``: vLLM's Qwen3 has no ``o_proj`` bias, and its loader dropped the trainer's
    without a word at every sync (the checksum counts what the worker read; in bfloat16 the probe passed with the
    biases moved by N(0, 0.5) and the engine sampled 0.34 off the trainer's log-probs)."""
    from pact_fast.config import Config
    from pact_fast.model_setup import build_policy, fit_chat_template
    from pact_fast.models import random_qwen3
    from pact_fast.rollout_vllm import VLLMRolloutEngine

    config = Config()
    tokenizer = build_policy(config.model, torch.device("cpu"), 0).tokenizer
    fit_chat_template(config, tokenizer, _examples(1), log=None)
    model = random_qwen3(len(tokenizer), hidden_size=64, intermediate_size=128, num_layers=1, num_heads=1,
                         num_kv_heads=1, head_dim=64, max_positions=1024, seed=0, attention_bias=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    cfg = RolloutConfig(engine="vllm", vllm_max_model_len=512, vllm_kv_cache_gb=0.25, vllm_dtype="bfloat16")
    with pytest.raises(RolloutEngineError, match="has no place for model.layers.0.self_attn.o_proj.bias"):
        VLLMRolloutEngine(model, tokenizer, cfg, seed=0)


@needs_vllm
def test_a_killed_engine_process_is_an_error_with_a_message(smollm2_engine):
    import psutil

    def engine_core(p):
        try:
            return "EngineCore" in " ".join(p.cmdline()) + p.name()
        except psutil.Error:  # a child that has exited, not yet reaped (a zombie), has no command line to read
            return False

    engine = smollm2_engine
    children = psutil.Process().children(recursive=True)
    core = [p for p in children if engine_core(p)]
    assert core, f"no EngineCore process among {[p.name() for p in children]}"
    for p in core:
        os.kill(p.pid, signal.SIGKILL)
    time.sleep(2)
    with pytest.raises(RolloutEngineError, match="vLLM engine"):
        engine.rollout(_examples(1), _make_env, group_size=1)


def _torchrun_vllm(mode, out, smollm2_dir, logs, *extra):
    """A 2-rank ``pact-fast train`` with the vLLM engine through tests/vllm_fsdp_worker.py (gloo, 2 steps, one
    prompt group per rank, a small KV cache so that two engines and two trainers fit); each rank's output in
    its own file under ``logs``. The workers import this checkout's pact_fast (PYTHONPATH), installed or not."""
    root = Path(__file__).parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29547",
           f"--log-dir={logs}", "--redirects=3", str(Path(__file__).parent / "vllm_fsdp_worker.py"), mode, str(out),
           "--model", str(smollm2_dir), "rollout.engine=vllm", "rollout.vllm_max_model_len=2048",
           "rollout.vllm_kv_cache_gb=0.25", "train.steps=2", "train.prompts_per_step=2", "rollout.group_size=2",
           "rollout.max_new_tokens=16", "rollout.max_turns=1", "data.train_tasks=4", "data.eval_tasks=1",
           "train.eval_every=0", "train.progress=false", "train.save_every=0", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, cwd=root, env=env)
    rank_logs = {int(p.parent.name): p.read_text() for p in Path(logs).rglob("stderr.log")}
    return proc, rank_logs


@needs_vllm
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_two_ranks_each_with_its_engine_train_in_sync(smollm2_dir, tmp_path, lora):
    """torchrun, 2 gloo ranks, FSDP2: each rank's engine gets the weights gathered from the shards (with LoRA, the
    adapters folded into them) and passes the probe before every rollout phase (the start, both steps, the final
    evaluation), and both ranks pushed the same full weights, which change with each update."""
    extra = ("model.lora.enabled=true", "train.lr=1e-3") if lora else ()
    proc, rank_logs = _torchrun_vllm("ok", tmp_path / "run", smollm2_dir, tmp_path / "logs", *extra)
    assert proc.returncode == 0, "\n".join(log[-2000:] for log in rank_logs.values()) or proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss/total" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert math.isfinite(r["loss/total"]) and r["skipped_step"] == 0.0
        assert 0 < r["rollout/logp_mismatch_mean"] <= r["rollout/logp_mismatch_max"] < 1e-3  # float32 engines
    checks = {rank: [json.loads(line) for line in (tmp_path / "run" / f"probes_rank{rank}.jsonl").read_text()
                     .splitlines()] for rank in (0, 1)}
    for rank, rows in checks.items():
        # the start (no push), the gathered copy before step 1, after each of the 2 updates
        assert [c["syncs"] for c in rows] == [0, 1, 2, 3], (rank, rows)
        assert all(c["probe_err"] < PROBE_ATOL[torch.float32] for c in rows), (rank, rows)
    sums = [[c["weights_sum"] for c in checks[rank]] for rank in (0, 1)]
    assert sums[0] == sums[1], "the ranks pushed different weights"
    assert sums[0][1] != sums[0][2] != sums[0][3], "an update did not reach the engines"


@needs_vllm
def test_a_rank_whose_engine_serves_other_weights_stops_every_rank(smollm2_dir, tmp_path):
    """Rank 1's pushes are corrupted (its final norm doubled): its probe fails in step 1, and both ranks stop
    with rank 1's message (status 2, one line each), none left waiting in a collective."""
    proc, rank_logs = _torchrun_vllm("corrupt", tmp_path / "run", smollm2_dir, tmp_path / "logs")
    assert proc.returncode != 0
    assert sorted(rank_logs) == [0, 1], proc.stderr[-3000:]
    for rank, log in rank_logs.items():
        lines = [line for line in log.splitlines() if line.startswith("pact-fast:")]
        assert len(lines) == 1 and "rank 1's vLLM engine" in lines[0], (rank, log[-3000:])
        assert "does not hold the trained weights" in lines[0]
        # no uncaught error (vLLM's own logged warnings may quote one: its chat-template warmup, with no tokenizer)
        assert not any(line.startswith("Traceback") for line in log.splitlines()), log[-3000:]
    passed = {rank: [json.loads(line)["syncs"] for line in (tmp_path / "run" / f"probes_rank{rank}.jsonl")
                     .read_text().splitlines()] for rank in (0, 1)}
    assert passed == {0: [0, 1], 1: [0]}, "rank 0 passed its step-1 check, rank 1 failed it"
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in steps if "loss/total" in r], "no step may complete"


@needs_vllm
def test_pact_fast_train_with_the_vllm_engine(smollm2_dir, tmp_path):
    cmd = [sys.executable, "-m", "pact_fast", "train", "--model", str(smollm2_dir), "--out", str(tmp_path),
           "rollout.engine=vllm", "rollout.vllm_max_model_len=2048", "train.steps=3", "train.prompts_per_step=1",
           "rollout.group_size=2", "rollout.max_new_tokens=16", "rollout.max_turns=1", "data.train_tasks=4",
           "data.eval_tasks=1", "train.eval_every=0", "train.progress=false", "train.save_every=0",
           "rollout.temperature=0.7", "rollout.top_p=0.9"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss/total" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:  # float32: the engine's log-probs are the trainer's at T = 0.7, top-p or not
        assert math.isfinite(r["loss/total"]) and r["skipped_step"] == 0.0
        assert 0 <= r["rollout/logp_mismatch_mean"] <= r["rollout/logp_mismatch_max"] < 1e-3
        assert r["rollout/is_clipped_frac"] == 0
    # pact-fast eval of the run samples through its engine, as the run's final evaluation did: the same numbers
    after = json.loads((tmp_path / "summary.json").read_text())["eval_after"]
    proc = subprocess.run([sys.executable, "-m", "pact_fast", "eval", "--run", str(tmp_path)], capture_output=True,
                          text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout[proc.stdout.index("{\n"):]) == pytest.approx(after)


def test_under_torchrun_a_ctrl_c_in_the_weight_sync_raises_after_the_ranks_share_its_outcome(monkeypatch):
    """Under torchrun the trainer's Ctrl-C raise (its step abort, ``stopping.StepAborted``) landed wherever the rank was:
    inside the engine's weight sync it left this rank out of ``gather_errors``, which the other ranks were in (they
    waited, or paired it with the trainer's agreement collective). Now it raises once gather_errors is done."""
    from pact_fast import rollout_vllm

    class Abort(BaseException):
        pass

    def abort(signum, frame):
        raise Abort

    calls = []

    def prepare(examples, prompts):
        os.kill(os.getpid(), signal.SIGINT)
        calls.append("prepare")  # not reached when the handler raises at once

    engine = object.__new__(rollout_vllm.VLLMRolloutEngine)
    engine._prompt_ids, engine.prepare = (lambda examples: [[1, 2]]), prepare
    monkeypatch.setattr(rollout_vllm.dist, "is_distributed", lambda: True)
    monkeypatch.setattr(rollout_vllm.dist, "gather_errors", lambda error: calls.append("gather") or [error, None])
    previous = signal.signal(signal.SIGINT, abort)
    try:
        with pytest.raises(Abort):
            engine.rollout([{}], None)
        assert calls == ["prepare", "gather"]
        assert signal.getsignal(signal.SIGINT) is abort  # the trainer's handler is back
    finally:
        signal.signal(signal.SIGINT, previous)
