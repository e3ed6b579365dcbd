"""LoRA through the whole trainer (``model.lora``, ``pact_fast.model_setup``): packed scoring of a PEFT-wrapped model,
adapter-only optimizer, checkpoints and resume, the reference policy as the base with adapters off, export
--merge, eval of a LoRA run, a frozen lm_head, and the one-line refusals."""
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import rel_err
from models import param_grads, separate_logprobs, tiny_causal_lm
from pact_fast.config import ConfigError, load_config
from pact_fast.distributed import decoder_layers
from pact_fast.model_setup import (AdaptersOffScorer, adapters_off, apply_lora, build_model_and_tokenizer,
                                   Policy, build_policy, default_lora_targets, lora_targets, merged_model)
from pact_fast.models import ModelError
from pact_fast.scoring import sequence_logprobs
from pact_fast.trainer import build, train, train_step
from test_trainer import TINY, tiny_for

HERE = Path(__file__).parent
LORA = ["model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8"]
ENV = {**os.environ, "PYTHONPATH": f"{HERE}:{HERE.parent}"}


def _randomise_adapters(model, seed=0):
    """LoRA's B starts at 0 (adapters off = on); random B and A make the adapters matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def _lora_cfg(**kw):
    return load_config(None, LORA + [f"model.lora.{k}={v}" for k, v in kw.items()]).model.lora


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_packed_scoring_of_a_lora_model_equals_separate_forwards(family):
    model = tiny_causal_lm(family, vocab_size=53).double()
    apply_lora(model, _lora_cfg())
    _randomise_adapters(model)
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, 53, (9,), generator=g).tolist()
    seqs = [prefix + torch.randint(0, 53, (n,), generator=g).tolist() for n in (7, 4, 11)]
    weights = [torch.randn(len(s) - 1, generator=g, dtype=torch.float64) for s in seqs]
    packed = sequence_logprobs(model, seqs)
    separate = separate_logprobs(model, seqs)
    for a, b in zip(packed, separate):  # the ops return fp32 log-probs
        assert rel_err(a.double(), b) < 1e-6
    packed_grads = param_grads(model, packed, weights)
    separate_grads = param_grads(model, separate, weights)
    assert packed_grads.keys() == separate_grads.keys()
    assert packed_grads and all("lora_" in n for n in packed_grads), "only the adapters get gradients"
    for name in packed_grads:
        assert rel_err(packed_grads[name], separate_grads[name]) < 1e-5, name


def test_default_targets_are_the_decoder_linears_and_bad_targets_are_refused():
    model = tiny_causal_lm("llama")
    assert default_lora_targets(model) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                           "v_proj"]
    assert lora_targets(model, _lora_cfg(target_modules="[q_proj,v_proj]")) == ["q_proj", "v_proj"]
    with pytest.raises(ModelError, match="'qkv' matches no module of LlamaForCausalLM: .*decoder layers: down_proj"):
        lora_targets(model, _lora_cfg(target_modules="[q_proj,qkv]"))
    with pytest.raises(ModelError, match="'lm_head' is the lm_head"):
        lora_targets(model, _lora_cfg(target_modules="[lm_head]"))
    with pytest.raises(ModelError, match="'act_fn' is a SiLUActivation"):
        lora_targets(model, _lora_cfg(target_modules="[act_fn]"))


def test_default_targets_of_a_moe_model_with_dense_mlps_adapt_those_layers_and_read_back(tmp_path):
    """peft on transformers 5 rewrote targets named gate_proj, up_proj, down_proj of DeepSeek-V3 (and GLM-4-MoE,
    Ernie 4.5-MoE...) into target_parameters of the fused routed experts, with r and alpha doubled there: the
    dense first layer's MLP and the shared experts (the decoder linears the default names) got no adapters, the
    routed experts (never a default target) got some, and the run's adapter_config.json was refused when read
    back ("made with peft's alpha_pattern=..."). Now every decoder linear, and only those, gets an adapter, the
    adapters save and load as they were, and scoring with them stays exact."""
    from pact_fast.model_setup import _adapter_config, check_adapter_options, read_adapter, save_adapter
    from test_architectures import group, tiny

    model = tiny("deepseek_v3")
    linears = {n for n, m in decoder_layers(model).named_modules() if isinstance(m, torch.nn.Linear)}
    peft_model = apply_lora(model, _lora_cfg())
    adapted = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A" in n}
    assert {f"model.layers.{n}" for n in linears} == adapted
    assert {"model.layers.0.mlp.gate_proj", "model.layers.1.mlp.shared_experts.down_proj"} <= adapted
    _randomise_adapters(model)
    save_adapter(peft_model, model.state_dict(), tmp_path / "adapter")
    check_adapter_options(tmp_path / "adapter", _adapter_config(tmp_path / "adapter"))
    again = tiny("deepseek_v3")
    state = read_adapter(apply_lora(again, _lora_cfg()), tmp_path / "adapter")
    assert all(torch.equal(state[n], p) for n, p in model.named_parameters() if "lora_" in n)
    sequences = group(model.config.vocab_size)
    with torch.no_grad():
        diff = max((a - b).abs().max().item()
                   for a, b in zip(sequence_logprobs(model, sequences), separate_logprobs(model, sequences)))
    assert diff < 1e-4, f"packed vs separate log-probs differ by {diff:.3g}"


def test_lora_config_refusals():
    with pytest.raises(ConfigError, match="model.lora.r=0 must be >= 1"):
        load_config(None, LORA + ["model.lora.r=0"])
    # model.lora is a section inside model: the check of every float option for finiteness did not reach it, and
    # alpha=inf scaled the adapters' B = 0 at init by inf: every logit NaN at the first forward
    for alpha in ("inf", "nan", "0"):
        with pytest.raises(ConfigError, match=f"model.lora.alpha={float(alpha)} must be a finite number > 0"):
            load_config(None, LORA + [f"model.lora.alpha={alpha}"])
    with pytest.raises(ConfigError, match="model.lora.adapter=/somewhere is set but model.lora.enabled is false"):
        load_config(None, ["model.lora.adapter=/somewhere"])
    with pytest.raises(ConfigError, match="unknown key 'model.lora.rank'"):
        load_config(None, ["model.lora.rank=8"])
    for peft_option in ("use_rslora=true", "use_dora=true", "bias=all", "modules_to_save=[lm_head]",
                        "init_lora_weights=pissa", "lora_alpha=16"):  # peft's options this LoRA does not implement
        with pytest.raises(ConfigError, match=f"unknown key 'model.lora.{peft_option.split('=')[0]}'"):
            load_config(None, LORA + [f"model.lora.{peft_option}"])


def test_reference_is_the_base_with_adapters_off_and_no_second_copy(tmp_path):
    config = load_config(None, TINY + LORA + ["loss.beta_kl=0.1", f"train.out_dir={tmp_path}"])
    c = build(config, log=lambda *a: None)
    assert isinstance(c.ref_scorer, AdaptersOffScorer) and c.ref_scorer.scorer is c.scorer
    policy_storage = {p.data_ptr() for p in c.model.parameters()}
    everything = {p.data_ptr() for m in (c.scorer, c.rollout_model) for p in m.parameters()}
    assert everything == policy_storage, "no second set of weights for the reference or the rollouts"
    base, _ = build_model_and_tokenizer(config.model, torch.device("cpu"), config.train.seed)
    _randomise_adapters(c.model)
    seqs = [[3, 9, 12, 4, 30, 7], [3, 9, 12, 5]]
    with torch.no_grad():
        with adapters_off(c.peft):
            off = sequence_logprobs(c.model, seqs)
        on = sequence_logprobs(c.model, seqs)
        plain = sequence_logprobs(base, seqs)
    for a, b, d in zip(off, plain, on):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        assert (d - b).abs().max() > 1e-3, "the adapters change the policy"


def test_optimizer_trains_only_the_adapters(tmp_path):
    config = load_config(None, TINY + LORA + ["train.steps=2", f"train.out_dir={tmp_path}"])
    c = build(config, log=lambda *a: None)
    in_optimizer = [p for group in c.optimizer.param_groups for p in group["params"]]
    named = dict(c.model.named_parameters())
    adapters = [p for n, p in named.items() if "lora_" in n]
    assert {id(p) for p in in_optimizer} == {id(p) for p in adapters}
    before = {n: p.detach().clone() for n, p in named.items()}
    for step in range(2):
        train_step(c, step)
    moved = [n for n, p in named.items() if not torch.equal(p, before[n])]
    assert moved and all("lora_B" in n or "lora_A" in n for n in moved), moved
    assert any("lora_B" in n for n in moved), "the adapters learn"


def test_gradient_checkpointing_keeps_adapter_gradients(tmp_path):
    """Frozen embeddings feed the first checkpointed layer; the adapters get the same gradients as without
    checkpointing."""
    grads = []
    for ckpt in (False, True):
        config = load_config(None, TINY + LORA + [f"train.grad_checkpointing={ckpt}", "loss.mode=sft",
                                                  f"train.out_dir={tmp_path / str(ckpt)}"])
        c = build(config, log=lambda *a: None)
        _randomise_adapters(c.model)
        seqs = [[3, 9, 12, 4, 30, 7], [3, 9, 12, 5, 8]]
        c.model.train()
        logps = sequence_logprobs(c.model, seqs)
        grads.append(param_grads(c.model, logps, [torch.ones(len(s) - 1) for s in seqs]))
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == len(
        [n for n, _ in c.model.named_parameters() if "lora_" in n])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


def test_grad_checkpointing_uses_transformers_current_name(tmp_path):
    """transformers 5.25 deprecates ``gradient_checkpointing_enable`` (a FutureWarning each run; gone in v6): the
    trainer calls ``activation_checkpointing_enable`` where the model has it, and still checkpoints every layer."""
    config = load_config(None, TINY + ["train.grad_checkpointing=true", "loss.mode=sft", f"train.out_dir={tmp_path}"])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        c = build(config, log=lambda *a: None)
    assert not [w for w in seen if "gradient_checkpointing_enable" in str(w.message)], [str(w.message) for w in seen]
    assert all(layer.gradient_checkpointing for layer in decoder_layers(c.model))


def _adapters(run_dir):
    ckpt = sorted((Path(run_dir) / "checkpoints").glob("step_*"))[-1]
    return ckpt, load_file(str(ckpt / "adapter_model.safetensors"))


@pytest.mark.parametrize("base_dtype", ["float32", "bfloat16"])
def test_checkpoints_hold_adapters_only_and_resume_exactly(tmp_path, base_dtype):
    lora = LORA + [f"model.lora.base_dtype={base_dtype}"]
    full = load_config(None, TINY + lora + ["train.steps=4", f"train.out_dir={tmp_path / 'full'}"])
    train(full, log=lambda *a: None)
    half = load_config(None, TINY + lora + ["train.steps=4", "train.stop_after=2", f"train.out_dir={tmp_path / 'half'}"])
    train(half, log=lambda *a: None)
    train(load_config(None, TINY + lora + ["train.steps=4", f"train.out_dir={tmp_path / 'half'}"]),
          resume=tmp_path / "half", log=lambda *a: None)
    (ckpt_a, a), (ckpt_b, b) = _adapters(tmp_path / "full"), _adapters(tmp_path / "half")
    assert ckpt_a.name == ckpt_b.name == "step_000004"
    assert not list(ckpt_a.glob("model*.safetensors")), "a LoRA checkpoint holds no base weights"
    assert json.loads((ckpt_a / "adapter_config.json").read_text())["r"] == 4
    assert a.keys() == b.keys() and all("lora_" in k for k in a)
    assert all(v.dtype == torch.float32 for v in a.values()), "adapters are float32 on any base"
    assert all(torch.equal(a[k], b[k]) for k in a), "N steps and N/2 + resume + N/2 must agree exactly"
    assert any(k.endswith("lora_B.weight") and a[k].abs().max() > 0 for k in a), "the adapters trained"
    with pytest.raises(FileNotFoundError, match="holds LoRA adapters only; resume it with model.lora.enabled=true"):
        train(load_config(None, TINY + ["train.steps=5", f"train.out_dir={tmp_path / 'half'}"]),
              resume=tmp_path / "half", log=lambda *a: None)


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "pact_fast", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


def test_export_merge_and_eval_of_a_lora_run(tmp_path):
    from transformers import AutoModelForCausalLM

    from pact_fast.evaluation import evaluate_model, run_config

    run = tmp_path / "run"
    train(load_config(None, TINY + LORA + ["train.steps=2", "train.lr=0.05", f"train.out_dir={run}"]),
          log=lambda *a: None)
    config, ckpt = run_config(run)
    assert config.model.lora.adapter == str(ckpt) and config.model.path is None
    for override in ("train.seed=1", "model.lora.r=4"):  # the built-in base is drawn from the run's seed
        with pytest.raises(ConfigError, match=f"{override.split('=')[0]} is the run's own"):
            run_config(run, [override])
    policy = build_policy(config.model, torch.device("cpu"), config.train.seed)
    base, _ = build_model_and_tokenizer(config.model, torch.device("cpu"), config.train.seed)
    proc = _cli("export", str(run), "--merge", str(tmp_path / "merged"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), local_files_only=True)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    seqs = [[3, 9, 12, 4, 30, 7, 2], [3, 9, 12, 5]]
    with torch.no_grad():
        adapted = separate_logprobs(policy.model, seqs)
        plain = separate_logprobs(merged, seqs)
        untrained = separate_logprobs(base, seqs)
    for a, m, u in zip(adapted, plain, untrained):
        torch.testing.assert_close(m, a, rtol=0, atol=1e-5)
        assert (a - u).abs().max() > 1e-4, "the adapters trained, so the merge must differ from the base"
    shown = {}  # the episodes each evaluation writes: the metrics of these tiny models are all 0 either way
    for name, cfg in (("lora", config), ("base", load_config(None, TINY)),
                      ("merged", load_config(None, tiny_for(model_path=True) + [f"model.path={tmp_path / 'merged'}",
                                                           "model.chat_template=model"]))):
        lines = []
        shown[name] = (evaluate_model(cfg, show=2, log=lines.append), [x for x in lines if x.startswith("===")])
    assert len(shown["lora"][1]) == 2
    assert shown["lora"] == shown["merged"], "eval of the LoRA run is eval of its merged model"
    assert shown["lora"][1] != shown["base"][1], "eval of the LoRA run loads its adapters, not the base alone"
    again = _cli("export", str(run), "--merge", str(tmp_path / "merged"))
    assert again.returncode == 2 and "is not empty" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    (tmp_path / "afile").write_text("x")  # a NotADirectoryError traceback before
    onto_file = _cli("export", str(run), "--merge", str(tmp_path / "afile"))
    assert onto_file.returncode == 2 and "is a file" in onto_file.stderr and "Traceback" not in onto_file.stderr


def test_refusals_are_one_line_before_any_weight_loads(tmp_path):
    full_run = tmp_path / "full"
    train(load_config(None, TINY + ["train.steps=1", f"train.out_dir={full_run}"]), log=lambda *a: None)
    proc = _cli("export", str(full_run), "--merge", str(tmp_path / "out"))
    assert proc.returncode == 2 and "nothing to merge: the run has no LoRA adapters" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    proc = _cli("train", "--out", str(tmp_path / "bad"), *TINY, *LORA, "model.lora.target_modules=[q_proj,nope]")
    assert proc.returncode == 2 and "'nope' matches no module" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists(), "refused before the run directory or any weight"
    adapter = sorted((full_run / "checkpoints").glob("step_*"))[-1]
    proc = _cli("eval", *tiny_for(evaluation=True), *LORA, f"model.lora.adapter={adapter}")
    assert proc.returncode == 2 and "no adapter_config.json" in proc.stderr
    lora_run = tmp_path / "lora"
    train(load_config(None, TINY + LORA + ["train.steps=1", f"train.out_dir={lora_run}"]), log=lambda *a: None)
    proc = _cli("eval", "--model", str(sorted((lora_run / "checkpoints").glob("step_*"))[-1]), *tiny_for(model_path=True, evaluation=True))
    assert proc.returncode == 2 and "holds LoRA adapters, not a model: use --run" in proc.stderr


def test_adapter_made_with_other_settings_is_refused(tmp_path):
    run = tmp_path / "run"
    train(load_config(None, TINY + LORA + ["train.steps=1", f"train.out_dir={run}"]), log=lambda *a: None)
    ckpt = sorted((run / "checkpoints").glob("step_*"))[-1]
    config = load_config(None, TINY + ["model.lora.enabled=true", "model.lora.r=8", "model.lora.alpha=8",
                                       f"model.lora.adapter={ckpt}"])
    with pytest.raises(ModelError, match="made with other LoRA settings \\(r: config 8, adapter 4\\)"):
        build_policy(config.model, torch.device("cpu"), 0)


def test_freeze_lm_head_keeps_the_head_and_trains_the_rest(tmp_path):
    untied = ["model.path=" + str(_untied_model_dir(tmp_path))]
    config = load_config(None, tiny_for(model_path=True) + untied + ["model.freeze_lm_head=true", "model.chat_template=model",
                                                "train.lr=0.01", f"train.out_dir={tmp_path / 'run'}"])
    c = build(config, log=lambda *a: None)
    head, embed = c.model.get_output_embeddings().weight, c.model.get_input_embeddings().weight
    assert not head.requires_grad and embed.requires_grad
    before_head, before_embed = head.detach().clone(), embed.detach().clone()
    train_step(c, 0)
    assert head.grad is None and torch.equal(head, before_head)
    assert not torch.equal(embed, before_embed), "the rest trains"


def _untied_model_dir(tmp_path):
    """A tiny untied Qwen3 on the built-in tokenizer, saved as a model directory."""
    from pact_fast.envs import build_tokenizer
    from pact_fast.models import random_qwen3

    tokenizer = build_tokenizer()
    model = random_qwen3(len(tokenizer), hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                         num_kv_heads=1, head_dim=16, max_positions=512, seed=0, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    out = tmp_path / "untied"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _step_metrics(run_dir, step):
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("step") == step and "grad_norm" in row:
            return row
    raise AssertionError(f"no step {step} in {run_dir}")


@pytest.mark.parametrize("base_dtype", ["float32", "bfloat16"])
def test_fsdp2_on_gloo_with_lora_matches_one_process(tmp_path, base_dtype):
    """Float32: the adapters after three steps agree. A bf16 base: the first step's loss and gradient norm agree
    to bf16's rounding (after it, Adam's normalised steps turn that rounding into weight differences as large as
    those between two micro-batch splits of one process), and each rank's unsharded rollout copy (a bf16 base with
    float32 adapters) takes the same weights from the shards at every step."""
    results, log = [], tmp_path / "rollouts"
    for nproc in (1, 2):
        out = tmp_path / f"n{nproc}"
        args = [str(out), *TINY, *LORA, f"model.lora.base_dtype={base_dtype}", "train.steps=3",
                "rollout.group_size=3", "train.lr=0.05"]
        env = {k: v for k, v in ENV.items() if k != "TRITON_INTERPRET"}
        env.update({"PACT_TEST_ROLLOUT_LOG": str(log)} if nproc == 2 else {})
        cmd = [sys.executable, str(HERE / "fsdp_worker.py"), *args] if nproc == 1 else [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={29543 if base_dtype == 'float32' else 29545}",  # one each: a port just closed may linger
            str(HERE / "fsdp_worker.py"), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        results.append(_adapters(out)[1])
    one, two = results
    assert one.keys() == two.keys() and all("lora_" in k for k in one)
    assert all(v.dtype == torch.float32 for v in two.values())
    if base_dtype == "float32":
        for k in one:
            torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-4)  # Adam: lr 0.05 steps, each ~0.05
    else:
        first = [_step_metrics(tmp_path / f"n{n}", 1) for n in (1, 2)]
        for key, rtol in (("loss/total", 1e-3), ("grad_norm", 1e-2)):
            assert first[1][key] == pytest.approx(first[0][key], rel=rtol), key
    rollouts = [[json.loads(line)["sum"] for line in Path(f"{log}.rank{rank}").read_text().splitlines()]
                for rank in (0, 1)]
    steps = rollouts[0][1:4]  # the evaluation before training, then the rollouts of steps 1, 2 and 3
    assert rollouts[0] == rollouts[1] and len(set(steps)) == 3, "each update reached both ranks' rollout copies"
    assert any(k.endswith("lora_B.weight") and one[k].abs().max() > 0 for k in one), "the adapters trained"


def test_pact_fast_train_lora_on_smollm2_checkpoints_resumes_and_exports(smollm2_dir, tmp_path):
    """The user's path: `pact-fast train --model <SmolLM2-135M> model.lora.enabled=true`, resume, export --merge."""
    from transformers import AutoModelForCausalLM

    from pact_fast.evaluation import run_config

    run = tmp_path / "run"
    common = ["train.prompts_per_step=1", "rollout.group_size=2", "rollout.max_new_tokens=12", "rollout.max_turns=1",
              "data.train_tasks=4", "data.eval_tasks=1", "train.progress=false", "train.tensorboard=false",
              "model.lora.enabled=true", "train.lr=1e-3"]
    proc = _cli("train", "--model", str(smollm2_dir), "--out", str(run), "train.steps=2", "train.stop_after=1",
                *common)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "LoRA r=16 alpha=32 on down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in proc.stderr
    proc = _cli("train", "--resume", str(run))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "resumed from" in proc.stderr and json.loads(proc.stdout)["steps"] == 2  # stdout: the summary alone
    ckpt, adapters = _adapters(run)
    assert ckpt.name == "step_000002" and sum(v.numel() for v in adapters.values()) < 5e6
    assert not list(ckpt.glob("model*.safetensors"))
    proc = _cli("export", str(run), "--merge", str(tmp_path / "merged"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    config, _ = run_config(run)
    policy = build_policy(config.model, torch.device("cpu"), config.train.seed)
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), local_files_only=True)
    seqs = [policy.tokenizer("The capital of France is Paris.")["input_ids"]]
    with torch.no_grad():
        adapted, plain = separate_logprobs(policy.model, seqs)[0], separate_logprobs(merged, seqs)[0]
        with adapters_off(policy.peft):
            base = separate_logprobs(policy.model, seqs)[0]
    assert (adapted - plain).abs().max() < 1e-4
    assert (adapted - base).abs().max() > 1e-4, "two LoRA steps at lr 1e-3 move the policy"


def test_eval_of_a_lora_run_may_point_at_its_base_where_it_now_lies(tmp_path):
    """A LoRA run's model.path is its base model's directory, which another machine keeps elsewhere: eval --run
    takes it (the adapters are the checkpoint); the adapters' own settings stay the run's."""
    from pact_fast.config import save_config
    from pact_fast.evaluation import run_config

    run = tmp_path / "run"
    (run / "checkpoints" / "step_000002").mkdir(parents=True)
    (run / "checkpoints" / "step_000002" / "trainer_state.pt").write_bytes(b"")
    save_config(load_config(None, ["model.path=/cluster/models/base", "model.lora.enabled=true"]),
                run / "config.yaml")
    config, ckpt = run_config(run, ["model.path=/home/me/models/base"])
    assert config.model.path == "/home/me/models/base" and config.model.lora.adapter == str(ckpt)
    with pytest.raises(ConfigError, match="model.lora.r is the run's own"):
        run_config(run, ["model.lora.r=4"])


def test_lora_options_set_while_lora_is_off_are_refused():
    """``model.lora.r=8`` without ``model.lora.enabled=true`` trained every weight, the rank ignored."""
    for override in ("model.lora.r=8", "model.lora.alpha=4", "model.lora.dropout=0.1",
                     "model.lora.target_modules=[q_proj]", "model.lora.base_dtype=bfloat16"):
        key = override.split("=")[0]
        with pytest.raises(ConfigError, match=f"{key}=.* is set but model.lora.enabled is false"):
            load_config(None, [override])
    assert load_config(None, ["model.lora.enabled=true", "model.lora.r=8"]).model.lora.r == 8


def test_a_tied_embedding_is_refused_as_a_target_and_an_untied_one_merges_exactly():
    """With tied embeddings a LoRA on embed_tokens reached the inputs only, while merging it changed the lm_head
    (the same tensor) too: the merged model's log-probs were 33 off the adapted model's."""
    with pytest.raises(ModelError, match="'embed_tokens' is the input embedding, tied to the lm_head"):
        lora_targets(tiny_causal_lm("llama", tie_word_embeddings=True), _lora_cfg(target_modules="[embed_tokens]"))
    model = tiny_causal_lm("llama")
    peft_model = apply_lora(model, _lora_cfg(target_modules="[embed_tokens,q_proj]"))
    _randomise_adapters(model)
    seqs = [[3, 9, 12, 4, 30, 7], [3, 9, 12, 5]]
    with torch.no_grad():
        adapted = separate_logprobs(model, seqs)
        packed = sequence_logprobs(model, seqs)
        merged = separate_logprobs(merged_model(Policy(model, None, peft_model)), seqs)
    for a, p, m in zip(adapted, packed, merged):
        torch.testing.assert_close(p.double(), a, rtol=0, atol=1e-5)
        torch.testing.assert_close(m, a, rtol=0, atol=1e-5)


ADAPTER_SEQS = [[3, 9, 12, 4, 30, 7], [3, 9, 12, 5]]


def _peft_adapter(base_dir, out, **options):
    """A LoRA adapter made by peft itself on ``base_dir`` (r=4, alpha=8, q_proj and v_proj, random weights), saved
    to ``out``; returns the log-probs ``peft.PeftModel.from_pretrained`` gives with it (the reference)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **options))
    _randomise_adapters(model, seed=1)
    peft_model.save_pretrained(str(out))
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)), str(out))
    with torch.no_grad():
        return separate_logprobs(loaded, ADAPTER_SEQS)


@pytest.mark.parametrize("options, refused", [
    pytest.param({}, None, id="plain"),
    pytest.param(dict(use_rslora=True), "use_rslora=True", id="rslora"),
    pytest.param(dict(alpha_pattern={"q_proj": 32}), "alpha_pattern", id="alpha_pattern"),
    pytest.param(dict(use_dora=True), "use_dora=True", id="dora"),
    pytest.param(dict(modules_to_save=["lm_head"]), "modules_to_save", id="modules_to_save"),
    pytest.param(dict(init_lora_weights="pissa"), "init_lora_weights='pissa'", id="pissa"),
])
def test_a_peft_adapter_loads_exactly_or_its_unsupported_option_is_refused(tmp_path, options, refused):
    """An adapter made by peft with an option pact_fast's LoRA does not implement loaded as plain LoRA: use_rslora
    (scale alpha / sqrt(r)) and alpha_pattern gave other log-probs (0.011 and 0.0026 off peft's own load)."""
    base = _untied_model_dir(tmp_path)
    reference = _peft_adapter(base, tmp_path / "adapter", **options)
    config = load_config(None, [f"model.path={base}", *LORA, "model.lora.target_modules=[q_proj,v_proj]",
                                f"model.lora.adapter={tmp_path / 'adapter'}"])
    if refused:
        with pytest.raises(ModelError, match=f"made with peft's {refused}.*which pact_fast's LoRA does not"):
            build_policy(config.model, torch.device("cpu"), 0)
        return
    policy = build_policy(config.model, torch.device("cpu"), 0)
    with torch.no_grad():
        got = separate_logprobs(policy.model, ADAPTER_SEQS)
    for g, r in zip(got, reference):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-6)


def test_an_adapter_made_on_another_base_model_is_said(tmp_path):
    """peft records the base an adapter was made on; one of the same shape made on another model loads without an
    error, so the set-up says so (by the model directories' names: a base that moved keeps its name)."""
    import shutil

    base = _untied_model_dir(tmp_path)
    _peft_adapter(base, tmp_path / "adapter")
    shutil.copytree(base, tmp_path / "moved" / base.name)
    shutil.copytree(base, tmp_path / "other-model")
    said = {}
    for name, path in (("same", base), ("moved", tmp_path / "moved" / base.name), ("other", tmp_path / "other-model")):
        config = load_config(None, [f"model.path={path}", *LORA, "model.lora.target_modules=[q_proj,v_proj]",
                                    f"model.lora.adapter={tmp_path / 'adapter'}"])
        lines = []
        build_policy(config.model, torch.device("cpu"), 0, log=lines.append)
        said[name] = [line for line in lines if "was made on" in line]
    assert said["same"] == said["moved"] == []
    assert len(said["other"]) == 1 and str(base) in said["other"][0] and "other-model" in said["other"][0]


def test_adapters_loaded_onto_a_base_of_another_dtype_than_they_trained_on_are_said(tmp_path):
    """A LoRA checkpoint records its base's dtype (adapter_model.safetensors metadata); adapters trained on a bf16
    base and loaded onto a float32 one (or the reverse) load without an error and give other log-probs, so the
    set-up says so; on the dtype they trained on, nothing is said."""
    config = load_config(None, TINY + LORA + ["model.lora.base_dtype=bfloat16", "train.steps=1",
                                              f"train.out_dir={tmp_path / 'run'}"])
    ckpt = train(config, log=lambda *a: None)["checkpoint"]
    said = {}
    for dtype in ("float32", "bfloat16"):
        config = load_config(None, TINY + LORA + [f"model.lora.base_dtype={dtype}", f"model.lora.adapter={ckpt}"])
        lines = []
        build_policy(config.model, torch.device("cpu"), 0, log=lines.append)
        said[dtype] = [line for line in lines if "trained on a" in line]
    assert said["bfloat16"] == []
    assert len(said["float32"]) == 1 and "bfloat16 base, this base is float32" in said["float32"][0]


@pytest.mark.parametrize("pretrained", [False, True], ids=["builtin", "model.path"])
def test_lora_dropout_acts_in_training_whatever_made_the_model(tmp_path, pretrained):
    """``from_pretrained`` returns a model in eval mode, which training kept: ``model.lora.dropout`` acted on the
    built-in model only, and a user's own model trained without it."""
    model = [f"model.path={_untied_model_dir(tmp_path)}", "model.chat_template=model"] if pretrained else []
    seqs = [[3, 9, 12, 4, 30, 7], [3, 9, 12, 5]]
    scores = {}
    for dropout in (0.0, 0.5):
        config = load_config(None, tiny_for(model_path=pretrained) + LORA + model + [f"model.lora.dropout={dropout}",
                                                          f"train.out_dir={tmp_path / str(dropout)}"])
        c = build(config, log=lambda *a: None)
        train_step(c, 0)  # rollouts switch the model to eval mode and back
        _randomise_adapters(c.model)
        with torch.no_grad():
            scores[dropout] = [sequence_logprobs(c.model, seqs) for _ in range(2)]
    for a, b in zip(*scores[0.0]):
        assert torch.equal(a, b), "no dropout: the same log-probs twice"
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(*scores[0.5])), "dropout 0.5 on the adapters' input"


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_grad_checkpointing_runs_on_a_users_own_model(tmp_path, lora):
    """transformers checkpoints a layer only in training mode, and ``from_pretrained`` returns eval mode: with
    ``model.path``, ``train.grad_checkpointing=true`` kept every activation, silently."""
    config = load_config(None, tiny_for(model_path=True) + (LORA if lora else []) + [
        f"model.path={_untied_model_dir(tmp_path)}", "model.chat_template=model", "train.grad_checkpointing=true",
        "loss.mode=sft", f"train.out_dir={tmp_path / 'run'}"])
    c = build(config, log=lambda *a: None)
    calls = []
    layers = decoder_layers(c.model)
    for layer in layers:
        def counted(*args, _func=layer._gradient_checkpointing_func, **kwargs):
            calls.append(1)
            return _func(*args, **kwargs)
        layer._gradient_checkpointing_func = counted
    stats = train_step(c, 0)
    assert len(calls) == 2 * stats.micro_batches, "every layer of every micro-batch's forward is checkpointed"


def test_resume_refuses_a_changed_freeze_lm_head_in_one_line(tmp_path):
    """``--resume RUN model.freeze_lm_head=true`` on a full fine-tune was a traceback from the optimizer's state
    (one parameter fewer to train)."""
    train(load_config(None, TINY + ["train.steps=2", "train.stop_after=1", f"train.out_dir={tmp_path}"]),
          log=lambda *a: None)
    proc = _cli("train", "--resume", str(tmp_path), "model.freeze_lm_head=true", timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"pact-fast: --resume {tmp_path}: model.freeze_lm_head is the run's own (it decides which weights train, "
        "and so the optimizer state its checkpoint holds); it cannot change on resume")


def test_an_adapter_of_other_modules_names_them_and_target_names_are_explained(tmp_path):
    """A peft adapter on q_proj and v_proj loaded into the default targets (every decoder linear) said only that
    tensors were missing; a regex, a dotted path or all-linear as a target said only that it matched nothing."""
    base = _untied_model_dir(tmp_path)
    _peft_adapter(base, tmp_path / "adapter")
    config = load_config(None, [f"model.path={base}", *LORA, f"model.lora.adapter={tmp_path / 'adapter'}"])
    with pytest.raises(ModelError, match=r"target_modules: config \['down_proj', .*'v_proj'\], adapter \['q_proj', "
                                         r"'v_proj'\]\)"):
        build_policy(config.model, torch.device("cpu"), 0)
    for target in ("all-linear", "self_attn.q_proj", ".*proj"):
        with pytest.raises(ModelError, match=f"'{re.escape(target)}' matches no module .*: target modules are module "
                                             "names such as q_proj, not paths, regexes or all-linear"):
            lora_targets(tiny_causal_lm("llama"), _lora_cfg(target_modules=f"[{target}]"))


def test_attention_dropout_of_a_users_own_model_is_refused_before_any_step(tmp_path):
    """Trained in training mode, a model whose config asks for attention dropout (which tree attention does not
    implement) raised a traceback at its first step; in eval mode it had trained without it, silently."""
    from pact_fast.envs import build_tokenizer
    from pact_fast.models import random_qwen3

    tokenizer = build_tokenizer()
    model = random_qwen3(len(tokenizer), hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                         num_kv_heads=1, head_dim=16, max_positions=512, seed=0, attention_dropout=0.1,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    config = load_config(None, tiny_for(model_path=True) + [f"model.path={tmp_path / 'model'}", "model.chat_template=model",
                                       f"train.out_dir={tmp_path / 'run'}"])
    with pytest.raises(ModelError, match="attention_dropout=0.1, which tree attention does not implement"):
        build(config, log=lambda *a: None)
    policy = build_policy(config.model, torch.device("cpu"), 0)  # evaluation samples in eval mode: no dropout
    assert not policy.model.training


def test_a_run_started_from_adapters_resumes_after_they_are_gone(tmp_path):
    """A run started from ``model.lora.adapter`` (another run's checkpoint, which that run's keep_last may prune)
    read those adapters again on every resume, although its own checkpoint replaces them: once they were gone it
    could never resume (and model.lora.adapter cannot change on resume)."""
    train(load_config(None, TINY + LORA + ["train.steps=1", "train.lr=0.05", f"train.out_dir={tmp_path / 'a'}"]),
          log=lambda *a: None)
    start, _ = _adapters(tmp_path / "a")
    b = TINY + LORA + ["train.steps=2", f"model.lora.adapter={start}"]
    train(load_config(None, b + [f"train.out_dir={tmp_path / 'whole'}"]), log=lambda *a: None)
    train(load_config(None, b + ["train.stop_after=1", f"train.out_dir={tmp_path / 'b'}"]), log=lambda *a: None)
    os.replace(start, tmp_path / "elsewhere")
    train(load_config(None, b + [f"train.out_dir={tmp_path / 'b'}"]), resume=tmp_path / "b", log=lambda *a: None)
    whole, resumed = _adapters(tmp_path / "whole")[1], _adapters(tmp_path / "b")[1]
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def _float_buffer_dtypes(model):
    return {b.dtype for b in model.buffers() if b.is_floating_point()}


def _base_and_adapter_dtypes(model):
    base = {p.dtype for n, p in model.named_parameters() if "lora_" not in n}
    adapters = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
    return base, adapters


def test_a_bf16_base_holds_the_rounded_base_weights_and_trains_float32_adapters(tmp_path):
    """``model.lora.base_dtype=bfloat16``: the frozen base is the float32 one rounded to bf16 (half the bytes),
    the adapters, their gradients and AdamW state float32; training moves the adapters only; the policy's
    log-probs are the float32 base's to bf16 precision."""
    runs = {}
    for dtype in ("float32", "bfloat16"):
        config = load_config(None, TINY + LORA + [f"model.lora.base_dtype={dtype}", "train.steps=2", "train.lr=0.05",
                                                  f"train.out_dir={tmp_path / dtype}"])
        runs[dtype] = build(config, log=lambda *a: None)
    c16, c32 = runs["bfloat16"], runs["float32"]
    assert _base_and_adapter_dtypes(c16.model) == ({torch.bfloat16}, {torch.float32})
    assert _float_buffer_dtypes(c16.model) == {torch.float32}, "RoPE's inv_freq is not rounded to bf16"
    assert c16.model.get_input_embeddings().weight is c16.model.get_output_embeddings().weight, "still tied"
    named16, named32 = dict(c16.model.named_parameters()), dict(c32.model.named_parameters())
    for name, p in named16.items():
        if "lora_" not in name:
            assert torch.equal(p, named32[name].to(torch.bfloat16)), name
    base_bytes = {k: sum(p.numel() * p.element_size() for n, p in c.model.named_parameters() if "lora_" not in n)
                  for k, c in runs.items()}
    assert 2 * base_bytes["bfloat16"] == base_bytes["float32"]
    in_optimizer = [p for group in c16.optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in in_optimizer} == {id(p) for n, p in named16.items() if "lora_" in n}
    before = {n: p.detach().clone() for n, p in named16.items()}
    for step in range(2):
        train_step(c16, step)
    moved = [n for n, p in named16.items() if not torch.equal(p, before[n])]
    assert moved and all("lora_" in n for n in moved) and any("lora_B" in n for n in moved), moved
    assert all(s["exp_avg"].dtype == torch.float32 for s in c16.optimizer.state.values())
    with torch.no_grad():  # the same adapters on both bases
        for name, p in named32.items():
            if "lora_" in name:
                p.copy_(named16[name])
    seqs = [[3, 9, 12, 4, 30, 7, 2], [3, 9, 12, 5]]
    with torch.no_grad():
        on16, on32 = sequence_logprobs(c16.model, seqs), sequence_logprobs(c32.model, seqs)
    diff = torch.cat([(a - b).abs() for a, b in zip(on16, on32)])
    assert 0 < diff.max() < 0.1, "the bf16 base runs in bf16, within bf16's rounding of the float32 base"


def test_export_of_a_bf16_base_run_merges_in_float32_onto_the_base_it_trained_on(tmp_path):
    from transformers import AutoModelForCausalLM

    from pact_fast.evaluation import run_config

    run = tmp_path / "run"
    train(load_config(None, TINY + LORA + ["model.lora.base_dtype=bfloat16", "train.steps=2", "train.lr=0.05",
                                           f"train.out_dir={run}"]), log=lambda *a: None)
    config, _ = run_config(run)
    assert config.model.lora.base_dtype == "bfloat16"
    policy = build_policy(config.model, torch.device("cpu"), config.train.seed)
    assert _base_and_adapter_dtypes(policy.model) == ({torch.bfloat16}, {torch.float32})
    proc = _cli("export", str(run), "--merge", str(tmp_path / "merged"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), local_files_only=True)
    merged_params = dict(merged.named_parameters())
    assert {p.dtype for p in merged_params.values()} == {torch.float32}
    scale = config.model.lora.alpha / config.model.lora.r
    adapted = 0
    for name, module in policy.model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            A, B = module.lora_A["default"].weight.double(), module.lora_B["default"].weight.double()
            expected = module.base_layer.weight.double() + scale * (B @ A)  # the bf16 base, exactly, plus the delta
            got = merged_params[name.replace("base_model.model.", "", 1) + ".weight"].double()
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
            adapted += bool((B @ A).abs().max() > 0)
    assert adapted, "the adapters trained"
    embed = policy.model.get_input_embeddings().weight
    assert torch.equal(merged.get_input_embeddings().weight, embed.float()), "the base's own bf16 weights"


def test_fsdp2_of_an_older_torch_refuses_a_bf16_base_in_one_line(monkeypatch):
    """FSDP2 before torch 2.8 asserts on a layer holding float32 adapters beside bf16 weights, at the first step."""
    from pact_fast import distributed

    model = tiny_causal_lm("qwen3")
    apply_lora(model, _lora_cfg())
    model.to(torch.bfloat16)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(torch, "__version__", "2.7.1+cu126")
    with pytest.raises(ConfigError, match="bfloat16 and float32 parameters .*use torch >= 2.8, or "
                                          "model.lora.base_dtype=float32"):
        distributed.shard(model)


def test_the_planner_plans_the_bf16_base_a_config_asks_for():
    """``options_from_config`` carries ``model.lora.base_dtype`` through; the weights term is the bytes of the policy
    ``build_policy`` makes (a bf16 base: half the base's, the adapters float32); ``--no-lora`` over such a config
    plans a float32 base, as ``model_setup.base_dtype`` builds it without LoRA."""
    from pact_fast import planner

    predicted, built = {}, {}
    for dtype in ("float32", "bfloat16"):
        config = load_config(None, TINY + LORA + [f"model.lora.base_dtype={dtype}", "train.device=cpu",
                                                  "train.attn_backend=sdpa"])
        options = planner.options_from_config(config)
        assert options.lora_base_dtype == dtype and options.bf16_base == (dtype == "bfloat16")
        model = build_policy(config.model, torch.device("cpu"), 0).model
        shape = planner.shape_from_config(model.config.to_dict(), "tiny")
        predicted[dtype] = planner.predict(shape, 256, options).terms["weights"]
        built[dtype] = sum(p.numel() * p.element_size() for p in model.parameters())
        adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert predicted == built
    assert 2 * (predicted["bfloat16"] - 4 * adapters) == predicted["float32"] - 4 * adapters
    bf16_lora = load_config(None, LORA + ["model.lora.base_dtype=bfloat16"])
    assert planner.options_from_config(bf16_lora, lora=False).lora_base_dtype == "float32"  # --no-lora
    with pytest.raises(planner.PlanError, match="--lora-base-dtype bfloat16 without LoRA"):
        planner.options_from_config(bf16_lora, lora=False, lora_base_dtype="bfloat16")


def test_a_pretrained_model_loads_as_a_bf16_base(smollm2_dir):
    """The user's model read in bf16 (the rounded float32 weights), float32 adapters, and its packed scoring
    agrees with its own forward in bf16 (what the trainer checks before any step)."""
    from pact_fast.scoring import check_model

    policies = {dtype: build_policy(load_config(None, [f"model.path={smollm2_dir}", "model.lora.enabled=true",
                                                       f"model.lora.base_dtype={dtype}"]).model,
                                    torch.device("cpu"), 0)
                for dtype in ("float32", "bfloat16")}
    model16, model32 = policies["bfloat16"].model, policies["float32"].model
    assert _base_and_adapter_dtypes(model16) == ({torch.bfloat16}, {torch.float32})
    assert _float_buffer_dtypes(model16) == {torch.float32}, "RoPE's inv_freq is not rounded to bf16"
    named32 = dict(model32.named_parameters())
    assert all(torch.equal(p, named32[n].to(torch.bfloat16)) for n, p in model16.named_parameters() if "lora_" not in n)
    result = check_model(model16)
    assert result["max_abs_diff"] <= result["tolerance"][0] == 1.0


@pytest.mark.parametrize("targets", [(), ("embed_tokens", "q_proj", "down_proj")], ids=["default", "embedding"])
def test_the_vllm_engine_gets_the_adapted_weights_under_the_plain_models_names(targets):
    """``rollout_vllm.engine_weights``: what the vLLM engine is synced with is the merged model, name for name and
    within float32 rounding; the adapters switched off give the base."""
    import copy

    from pact_fast.rollout_vllm import engine_weights

    model = tiny_causal_lm("llama")  # untied: its embedding may be adapted
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = _lora_cfg(target_modules=f"[{','.join(targets)}]") if targets else _lora_cfg()
    peft_model = apply_lora(model, cfg)
    _randomise_adapters(model)
    merged = dict(copy.deepcopy(peft_model).merge_and_unload().named_parameters())
    got = dict(engine_weights(model))
    assert list(got) == list(merged) == list(base)
    for name, value in got.items():
        torch.testing.assert_close(value, merged[name], rtol=0, atol=1e-6)
    moved = [n for n in got if not torch.equal(got[n], base[n])]
    assert moved and all(any(t in n for t in targets or ("proj",)) for n in moved), moved
    with adapters_off(peft_model):
        assert all(torch.equal(v, base[n]) for n, v in engine_weights(model))


def test_the_adapters_of_a_pretrained_model_are_drawn_from_the_runs_seed(tmp_path):
    """peft draws lora_A from torch's global random state, which differs between processes (torchrun ranks then
    started from different adapters) and after any other draw; the adapters are the seed's, and the global state is
    left as it was."""
    model = tiny_causal_lm("qwen3")
    model.save_pretrained(tmp_path / "m")
    from pact_fast.envs import build_tokenizer

    build_tokenizer().save_pretrained(tmp_path / "m")
    cfg = load_config(None, [f"model.path={tmp_path / 'm'}", *LORA]).model

    def adapters(seed, draws):
        torch.manual_seed(1234)
        torch.rand(draws)  # whatever ran before in this process
        state = torch.get_rng_state()
        model = build_policy(cfg, torch.device("cpu"), seed).model
        assert torch.equal(torch.get_rng_state(), state), "the global random state is left as it was"
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}

    a, b, other = adapters(0, 1), adapters(0, 7), adapters(1, 1)
    assert a and all(torch.equal(a[n], b[n]) for n in a)
    assert not any(torch.equal(a[n], other[n]) for n in a)


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk-full", "ctrl-c"])
def test_an_export_cut_short_leaves_no_half_written_model(tmp_path, monkeypatch, error):
    """A full disk (or a Ctrl-C) while `export --merge` wrote the merged model left `.tmp-OUT` beside OUT, as big as
    the model, and the disk error was a traceback."""
    from transformers import PreTrainedModel

    from pact_fast.evaluation import run_config
    from pact_fast.model_setup import export_merged

    run = tmp_path / "run"
    train(load_config(None, TINY + LORA + ["train.steps=1", f"train.out_dir={run}"]), log=lambda *a: None)
    config, _ = run_config(run)
    save = PreTrainedModel.save_pretrained

    def save_then_fail(self, directory, *args, **kwargs):
        save(self, directory, *args, **kwargs)
        assert any(Path(directory).iterdir()), "the weights are written before the failure"
        raise error

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_then_fail)
    out = tmp_path / "exports" / "merged"
    expected = ModelError if isinstance(error, OSError) else KeyboardInterrupt
    with pytest.raises(expected) as info:
        export_merged(config, out, log=lambda *a: None)
    if expected is ModelError:
        assert "could not be written" in str(info.value) and "disk full" in str(info.value)
        assert "\n" not in str(info.value)
    assert not out.exists() and not list(out.parent.iterdir()), "nothing left behind"
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save)
    assert export_merged(config, out, log=lambda *a: None) == out and (out / "config.json").is_file()


@pytest.mark.parametrize("damage", ['{"r": 4, "lora_al', "[4, 8]"], ids=["cut-short", "not-a-mapping"])
def test_a_damaged_adapter_config_is_one_line_naming_it(tmp_path, damage):
    """A LoRA checkpoint's adapter_config.json cut short (or not a mapping) was a JSONDecodeError (AttributeError)
    traceback from `export --merge`, and a bare JSON message that named no file from `eval --run`."""
    run = tmp_path / "run"
    train(load_config(None, TINY + LORA + ["train.steps=1", f"train.out_dir={run}"]), log=lambda *a: None)
    file = run / "checkpoints" / "step_000001" / "adapter_config.json"
    file.write_text(damage)
    for args in (["export", str(run), "--merge", str(tmp_path / "merged")], ["eval", "--run", str(run)],
                 ["train", "--out", str(tmp_path / "again"), *TINY, *LORA, f"model.lora.adapter={file.parent}"]):
        proc = _cli(*args)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        last = proc.stderr.strip().splitlines()[-1]
        assert "Traceback" not in proc.stderr and last.startswith(f"pact-fast: {file}: ") and "damaged" in last, \
            (args, proc.stderr[-2000:])
    assert not (tmp_path / "merged").exists() and not (tmp_path / "again").exists()
