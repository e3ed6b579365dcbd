"""Numeric options out of their range, or not finite, are refused in one line naming the option and its bound,
before any step: a NaN weight would switch a loss term off, a negative step count would name a checkpoint
"step_-00001", a top_p of 0 would sample nothing."""
import dataclasses
import subprocess
import sys

import pytest

from pact_fast.config import BOUNDS, Config, ConfigError, load_config
from pact_fast.models import pretrained_defaults


@pytest.mark.parametrize("override,message", [
    ("train.steps=-1", "train.steps=-1 must be >= 1"),
    ("train.lr=0", "train.lr=0.0 must be > 0"),
    ("train.lr=nan", "train.lr=nan must be a finite number"),
    ("train.lr=inf", "train.lr=inf must be a finite number"),
    ("loss.lambda_sft=nan", "loss.lambda_sft=nan must be a finite number"),
    ("loss.adv_eps=nan", "loss.adv_eps=nan must be a finite number"),
    ("loss.beta_0=-1", "loss.beta_0=-1.0 must be >= 0"),
    ("loss.clip_eps_low=1", "loss.clip_eps_low=1.0 must be < 1"),
    ("train.min_lr_ratio=5", "train.min_lr_ratio=5.0 must be <= 1"),
    ("train.grad_clip=-1", "train.grad_clip=-1.0 must be >= 0"),
    ("rollout.top_p=0", "rollout.top_p=0.0 must be > 0"),
    ("rollout.top_p=2", "rollout.top_p=2.0 must be <= 1"),
    ("rollout.temperature=0", "rollout.temperature=0.0 must be >= 0.0001"),
    # the logits divided by it: every step's gradient was not finite at 1e-20; sampling failed at 1e-45
    ("rollout.temperature=1e-45", "rollout.temperature=1e-45 must be >= 0.0001"),
    # a group of equal rewards: (R - mean) / (0 + 0) was NaN, a traceback in the first step's loss
    ("loss.adv_eps=0", "loss.adv_eps=0.0 must be > 0"),
    ("rollout.group_size=0", "rollout.group_size=0 must be >= 1"),
    ("rollout.max_new_tokens=0", "rollout.max_new_tokens=0 must be >= 1"),
    ("train.prompts_per_step=0", "train.prompts_per_step=0 must be >= 1"),
    ("train.micro_batch_tokens=0", "train.micro_batch_tokens=0 must be >= 1"),
    ("train.update_epochs=0", "train.update_epochs=0 must be >= 1"),
    ("data.train_tasks=0", "data.train_tasks=0 must be >= 1"),
    ("data.eval_tasks=0", "data.eval_tasks=0 must be >= 1"),
    ("data.hops=[]", "data.hops=[] must be a non-empty list of hop counts from [1, 2, 3]"),
    ("data.hops=[7]", "data.hops=[7] must be a non-empty list of hop counts from [1, 2, 3]"),
    ("loss.loss_scale_factor=-5", "loss.loss_scale_factor=-5 must be >= 1"),
    ("loss.loss_scale_factor=0", "loss.loss_scale_factor=0 must be >= 1"),
    ("rollout.call_timeout=0", "rollout.call_timeout=0.0 must be > 0"),
    ("rollout.max_result_chars=-1", "rollout.max_result_chars=-1 must be >= 1"),
    ("data.format_reward=-1", "data.format_reward=-1.0 must be >= 0"),
    # success is reward >= 1: with a format reward of 1 a wrong answer whose calls all ran counted as a held-out
    # success (eval/success_rate, the summary's)
    ("data.format_reward=1", "data.format_reward=1.0 must be < 1: an episode of reward >= 1 counts as a success, and "
                             "a wrong answer with clean tool calls would count as one"),
    ("model.hidden_size=0", "model.hidden_size=0 must be >= 1"),
    # past torch's 64-bit seeds once the trainer derives its per-step and per-epoch seeds: an overflow mid-run
    ("train.seed=100000000000000000000", "train.seed=100000000000000000000 must be <= 4294967295"),
    ("data.seed=4294967296", "data.seed=4294967296 must be <= 4294967295"),
    ("loss.seed=-1", "loss.seed=-1 must be >= 0"),
    ("data.world_seed=-5", "data.world_seed=-5 must be >= 0"),
    # read as 1.0 (YAML's yes is True, float(True) is 1.0): trained at a learning rate of 1
    ("train.lr=yes", "train.lr: expected a number, got True"),
    ("loss.lambda_sft=true", "loss.lambda_sft: expected a number, got True"),
    # the only loss term switched off: every step trained nothing, at loss 0
    ("loss.mode=sft loss.lambda_sft=0", "loss.mode=sft with loss.lambda_sft=0: the SFT term is the only loss, and it "
                                        "would be 0 (every step trains nothing)"),
    ("loss.mode=sft_then_grpo loss.lambda_sft=0", "loss.mode=sft_then_grpo with loss.lambda_sft=0: the SFT term is "
                                                  "the only loss before loss.switch_progress, and it would be 0 "
                                                  "(every step trains nothing)"),
])
def test_out_of_range_or_non_finite_options_are_refused(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, override.split())
    assert str(info.value) == message


def test_a_list_or_mapping_for_a_string_option_is_refused(tmp_path):
    """train.out_dir: [runs/x] in YAML made a directory named "['runs/x']"."""
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  out_dir: [runs/x]\n")
    with pytest.raises(ConfigError, match=r"train.out_dir: expected a string, got \['runs/x'\]"):
        load_config(str(path))


@pytest.mark.parametrize("value,shown", [("010", "8"), ("yes", "True"), ("1_000", "1000"), ("null", "null")])
def test_a_config_files_unquoted_number_boolean_or_null_for_a_string_option_is_refused(tmp_path, value, shown):
    """YAML reads `out_dir: 010` as 8 and `yes` as true: the run went to a directory named '8' or 'True' (`null`:
    'None'). The command line takes a string option's text as given; a file's must be quoted."""
    path = tmp_path / "run.yaml"
    path.write_text(f"train:\n  out_dir: {value}\n")
    with pytest.raises(ConfigError, match=f"train.out_dir: expected a string, got {shown} \\(YAML reads an unquoted"):
        load_config(str(path))
    path.write_text(f"train:\n  out_dir: '{value}'\n")
    assert load_config(str(path)).train.out_dir == value


def test_a_key_of_another_section_is_named_where_it_lives(tmp_path):
    """train.temperature listed train's keys only: which section holds temperature was left to the user."""
    with pytest.raises(ConfigError, match=r"^unknown key 'train.temperature' \(did you mean rollout.temperature\?\); "
                                          "valid keys here: attn_backend"):
        load_config(None, ["train.temperature=0.5"])
    path = tmp_path / "run.yaml"
    path.write_text("rollout:\n  seed: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'rollout.seed' \(did you mean data.seed or loss.seed or "
                                          r"train.seed\?\)"):
        load_config(str(path))
    with pytest.raises(ConfigError, match=r"^unknown key 'train.stpes'; valid keys here"):
        load_config(None, ["train.stpes=3"])


def test_every_bound_names_an_option_and_the_defaults_keep_them():
    config = Config()
    for key in BOUNDS:
        section, name = key.split(".")
        assert name in {f.name for f in dataclasses.fields(getattr(config, section))}, key
    load_config(None, [])  # the built-in job's defaults
    load_config(None, [f"{k}={v}" for k, v in pretrained_defaults().items()])  # a pretrained model's


def test_a_string_option_takes_the_text_as_given():
    """Paths on the command line are not YAML: `--out 010` wrote to '8', `runs/exp #2` to 'runs/exp', `yes` was
    'True'; `null` still unsets an optional path. A value YAML cannot read is one line naming the key."""
    config = load_config(None, ["train.out_dir=010", "data.path=runs/exp #2", "data.eval_path=yes",
                                "model.path=null", "train.steps=3"])
    assert (config.train.out_dir, config.data.path, config.data.eval_path) == ("010", "runs/exp #2", "yes")
    assert config.model.path is None and config.train.steps == 3
    assert load_config(None, ["data.hops=[1, 2]"]).data.hops == (1, 2)
    with pytest.raises(ConfigError, match=r"train.steps='\[x': not a valid value"):
        load_config(None, ["train.steps=[x"])
    # an empty value: the run went into the working directory (out_dir); `model.path=$UNSET` or `data.path=`
    # trained the built-in model on the built-in tasks without a word
    for key in ("train.out_dir", "model.path", "data.path", "loss.lambda_sft"):
        with pytest.raises(ConfigError, match=rf"^{key}= has no value; leave the key out for its default$"):
            load_config(None, [f"{key}= "])


@pytest.mark.parametrize("text,words", [
    ("train:\n  steps: 2\nloss:\n  anchor_q: 0.1\n  anchor_q: 0.5\n", ":5: key 'anchor_q' given twice (first on line 4)"),
    ("train:\n  steps: 2\nmodel:\n  path:\n", ":4: key 'path' has no value: give one, or write null for none"),
    ("data: {path: , eval_path: null}\n", ":1: key 'path' has no value"),
    ("train:\n  stpes: 2\n", ": unknown key 'train.stpes'"),
], ids=["twice", "empty", "empty-flow", "typo"])
def test_a_config_files_bad_key_is_refused_naming_the_file(tmp_path, text, words):
    """YAML kept the last of two `train:` sections (or keys) quietly, and read `path:` with nothing after it as
    null (a model path forgotten there trained the built-in model without a word); an unknown key in a file did not
    say which file it came from."""
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(path) in str(info.value) and words in str(info.value), info.value


def test_null_written_out_in_a_config_file_is_none(tmp_path):
    """A run's own config.yaml writes `null` for a key that is None; it reads back as None."""
    written = tmp_path / "null.yaml"
    written.write_text("model:\n  path: null\ndata:\n  path: ~\n")
    config = load_config(str(written))
    assert config.model.path is None and config.data.path is None


def test_a_runs_config_is_written_whole_and_an_empty_one_is_refused(tmp_path):
    """save_config writes through a temporary file (a crash mid-write left a cut config.yaml); eval --run of a run
    whose config.yaml is empty evaluated it under every default (32 held-out tasks instead of the run's)."""
    from pact_fast import checkpoint
    from pact_fast.config import save_config

    run = tmp_path / "run"
    (run / "checkpoints" / "step_000001").mkdir(parents=True)
    save_config(load_config(None, ["data.eval_tasks=2"]), run / "config.yaml")
    assert load_config(str(run / "config.yaml")).data.eval_tasks == 2
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml"]  # no temporary left
    (run / "config.yaml").write_text("")
    with pytest.raises(FileNotFoundError, match="config.yaml is empty"):
        checkpoint.latest_with_config(run)


def test_a_runs_broken_config_is_named_as_the_runs_not_as_a_config_flag(tmp_path):
    """eval --run / --resume of a run whose config.yaml is not YAML said `--config <path>`, a flag never given."""
    from pact_fast.evaluation import run_config

    run = tmp_path / "run"
    (run / "checkpoints" / "step_000001").mkdir(parents=True)
    (run / "checkpoints" / "step_000001" / "trainer_state.pt").write_bytes(b"")
    (run / "config.yaml").write_text("train: [\n")
    with pytest.raises(ConfigError, match=f"^the run's config {run / 'config.yaml'}: not valid YAML") as info:
        run_config(run)
    # YAML's own words name the file and its line, not a "<unicode string>" with a source excerpt
    assert f'in "{run / "config.yaml"}", line 2' in str(info.value) and "unicode string" not in str(info.value)


def test_options_that_run_but_not_as_they_suggest_are_said_at_start():
    from pact_fast.trainer import config_warnings

    assert config_warnings(load_config(None, []), 400) == []  # the main job says nothing
    said = config_warnings(load_config(None, ["rollout.group_size=1", "rollout.greedy=true", "train.prompts_per_step=16",
                                              "train.warmup_steps=500", "train.steps=300"]), 10)
    assert [w.split("=")[0] for w in said] == ["rollout.group_size", "rollout.greedy", "train.prompts_per_step",
                                               "train.warmup_steps"]
    assert config_warnings(load_config(None, ["loss.mode=sft", "rollout.group_size=1"]), 400) == []  # no RL term


@pytest.mark.parametrize("overrides,message", [
    (["model.path=/m", "model.hidden_size=64"], "model.hidden_size=64: with model.path the built-in model's shape"),
    (["data.path=d.jsonl", "data.train_tasks=2"], "data.train_tasks=2: with data.path the built-in tasks' options"),
    (["data.path=d.jsonl", "data.hops=[2]"], "data.hops=[2]: with data.path the built-in tasks' options"),
    (["data.path=d.jsonl", "data.eval_path=e.jsonl", "data.eval_tasks=2"],
     "data.eval_tasks=2: with data.eval_path the held-out rows are that file's"),
    (["loss.mode=grpo", "loss.lambda_sft=5"], "loss.lambda_sft=5.0: loss.mode=grpo does not read it"),
    (["loss.mode=grpo", "loss.beta_0=0.5"], "loss.beta_0=0.5: loss.mode=grpo does not read it"),
    (["loss.mode=sft", "loss.clip_eps_high=0.9"], "loss.clip_eps_high=0.9: loss.mode=sft does not read it"),
    (["loss.mode=sft", "loss.anchor_q=0.9"], "loss.anchor_q=0.9: loss.mode=sft does not read it"),
    (["loss.mode=sft_then_grpo", "loss.w_reason=0.5"], "loss.w_reason=0.5: loss.mode=sft_then_grpo does not read"),
    (["loss.switch_progress=0.3"], "loss.switch_progress=0.3: loss.mode=pact does not read it"),
    (["loss.loss_scale_factor=64"], "loss.loss_scale_factor=64: loss.loss_agg=token-mean does not read it"),
    (["loss.kl_estimator=k1"], "loss.kl_estimator=k1: loss.beta_kl=0: there is no KL term"),
    (["loss.anchor_mode=mix", "loss.seed=3"], "loss.seed=3: loss.anchor_mode=mix with anchor_q=0.3 draws no"),
    (["loss.anchor_q=1", "loss.seed=3"], "loss.seed=3: loss.anchor_mode=bernoulli with anchor_q=1 draws no"),
    (["loss.lambda_sft=0", "loss.beta_0=0.5"], "loss.beta_0=0.5: loss.lambda_sft=0: there is no SFT term"),
    (["loss.norm_adv_by_std=false", "loss.adv_eps=0.01"], "loss.adv_eps=0.01: loss.norm_adv_by_std=false"),
    (["train.wandb_project=mine"], "train.wandb_project=mine: train.wandb=false: nothing logs to wandb"),
    # the built-in model always renders with its tokenizer's own template: `model` ran as if it had not been given
    (["model.chat_template=model"], "model.chat_template=model: the built-in model's tokenizer has its own tool"),
])
def test_an_option_the_rest_of_the_config_leaves_unread_is_refused(overrides, message):
    """Each of these ran as if it had not been given (a shape option beside a pretrained model, a built-in task
    count beside a data file, an SFT weight in a GRPO run, ...): refused in one line, ending "leave it out"."""
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert str(info.value).startswith(message) and str(info.value).endswith("leave it out"), str(info.value)


def test_the_options_a_config_reads_are_taken_and_a_runs_own_config_is_not_checked_again(tmp_path):
    """Set where they are read, the same options load; values equal to the defaults (a run's config.yaml copied
    as a template) are not "set"; a run's own config.yaml (compare sets loss.mode on it) loads as it is."""
    from pact_fast.config import RUN_CONFIG, save_config

    load_config(None, ["loss.mode=grpo", "loss.clip_eps_high=0.28", "loss.beta_kl=0.1", "loss.kl_estimator=k1"])
    load_config(None, ["loss.mode=sft", "loss.lambda_sft=2"])
    load_config(None, ["loss.loss_agg=seq-mean-token-sum-norm", "loss.loss_scale_factor=64", "loss.anchor_q=0.5"])
    assert load_config(None, ["train.wandb=true", "train.wandb_project=mine"]).train.wandb_project == "mine"
    defaults = Config()  # the built-in model's shape and task count at their defaults: not "set", so taken
    load_config(None, ["model.path=/m", "data.path=d.jsonl", f"model.hidden_size={defaults.model.hidden_size}",
                       f"data.train_tasks={defaults.data.train_tasks}"])
    template = load_config(None, [])
    template.loss.mode = "grpo"  # every other option at its default, as written
    save_config(template, tmp_path / "grpo.yaml")
    assert load_config(str(tmp_path / "grpo.yaml")).loss.mode == "grpo"
    run = load_config(None, ["loss.beta_0=0.5"])
    run.loss.mode = "grpo"  # as compare sets it for its grpo run
    save_config(run, tmp_path / "config.yaml")
    assert load_config(str(tmp_path / "config.yaml"), label=RUN_CONFIG).loss.beta_0 == 0.5
    with pytest.raises(ConfigError, match="loss.beta_0=0.5: loss.mode=grpo does not read it"):
        load_config(str(tmp_path / "config.yaml"))


def test_a_config_path_that_is_a_directory_or_not_text_is_one_line(tmp_path):
    """`--config DIR` and a file of bytes that are not UTF-8 ended in IsADirectoryError / UnicodeDecodeError
    tracebacks."""
    with pytest.raises(ConfigError, match=rf"^--config {tmp_path}: a directory; give a YAML file$"):
        load_config(str(tmp_path))
    binary = tmp_path / "run.yaml"
    binary.write_bytes(b"\xff\xfetrain:\n  steps: 3\n")
    with pytest.raises(ConfigError, match=r"run.yaml: not UTF-8 text \(byte 0: invalid start byte\)"):
        load_config(str(binary))


def test_a_held_out_file_without_a_data_file_is_refused():
    """data.eval_path is read beside data.path only: alone, the built-in tasks held out their own, silently."""
    with pytest.raises(ConfigError, match=r"^data.eval_path=e.jsonl needs data.path"):
        load_config(None, ["data.eval_path=e.jsonl"])


def test_compare_refuses_only_what_none_of_its_modes_reads_and_what_a_mode_cannot_train_with():
    """compare trains several modes from one config: an option one of them reads is taken (switch_progress for
    sft_then_grpo); one none reads is refused; loss.lambda_sft=0 would train its SFT arms at loss 0."""
    from pact_fast.config import check_modes

    config = load_config(None, ["loss.switch_progress=0.3"], check_read=False)
    check_modes(config, ("sft_then_grpo", "pact"))
    with pytest.raises(ConfigError, match=r"loss.switch_progress=0.3: none of the modes grpo, pact reads it"):
        check_modes(config, ("grpo", "pact"))
    with pytest.raises(ConfigError, match=r"loss.mode=sft with loss.lambda_sft=0"):
        check_modes(load_config(None, ["loss.lambda_sft=0"]), ("sft", "pact"))


@pytest.mark.parametrize("overrides,message", [
    (["model.num_heads=3"], "model.num_heads=3 must be a multiple of model.num_kv_heads=2"),
    (["model.head_dim=7"], "model.head_dim=7 must be even"),
])
def test_a_built_in_model_that_cannot_be_built_is_refused_by_its_config(overrides, message):
    """3 query heads over 2 key/value heads failed in packed scoring's start-up check (blaming the model) after the
    model was built, or as a traceback with scoring.check=false; an odd head_dim in the rotary embedding."""
    with pytest.raises(ConfigError, match=f"^{message}"):
        load_config(None, overrides)
    load_config(None, ["model.path=/m"])  # a pretrained model's own shape is not these options'


def test_a_runs_config_saves_paths_absolute_and_they_compare_equal_to_the_relative_ones(tmp_path, monkeypatch):
    """config.yaml holds model.path, model.lora.adapter, data.path and data.eval_path absolute (they are read from
    any directory later), and config_changes reads them as the files they name: compare, which looks for a run of
    its configuration in a run directory, would otherwise see `--data tasks.jsonl` as another run's data."""
    from pact_fast.config import RUN_CONFIG, config_changes, save_config

    monkeypatch.chdir(tmp_path)
    config = load_config(None, ["data.path=tasks.jsonl", "data.eval_path=held/out.jsonl"])
    save_config(config, tmp_path / "config.yaml")
    saved = load_config(str(tmp_path / "config.yaml"), label=RUN_CONFIG)
    assert (saved.data.path, saved.data.eval_path) == (str(tmp_path / "tasks.jsonl"), str(tmp_path / "held/out.jsonl"))
    assert saved.model.path is None
    assert config_changes(saved, config) == []
    assert config_changes(saved, load_config(None, ["data.path=other.jsonl", "data.eval_path=held/out.jsonl"])) == [
        ("data.path", str(tmp_path / "tasks.jsonl"), str(tmp_path / "other.jsonl"))]


def test_a_path_that_starts_with_a_tilde_is_the_home_directorys(tmp_path, monkeypatch):
    """Neither YAML nor an override such as `train.out_dir=~/runs/x` (a word the shell leaves alone) expands `~`:
    the run went into a directory named `~` under the working one, and `model.path: ~/m` "did not exist"."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.yaml").write_text("train:\n  out_dir: ~/runs/x\ndata:\n  path: ~/tasks.jsonl\n")
    config = load_config(str(tmp_path / "run.yaml"), ["model.lora.enabled=true", "model.lora.adapter=~/adapters"])
    home = tmp_path / "home"
    assert config.train.out_dir == str(home / "runs" / "x")
    assert config.data.path == str(home / "tasks.jsonl")
    assert config.model.lora.adapter == str(home / "adapters")
    assert load_config(None, ["train.out_dir=runs/~x"]).train.out_dir == "runs/~x", "a ~ inside a path is a name"


@pytest.mark.parametrize("where", ["file", "override"])
def test_a_number_with_a_leading_zero_is_refused_not_read_as_octal(tmp_path, where):
    """YAML 1.1 reads 010 as the octal 8: `train.save_every: 010` checkpointed every 8 steps, `train.lr=010` trained
    at 8.0, and `data.hops: [010]` named an 8-hop task, each without a word."""
    cases = {"train.save_every": "010", "train.lr": "010", "data.hops": "[010]"}
    for key, text in cases.items():
        section, name = key.split(".")
        if where == "file":
            path = tmp_path / "run.yaml"
            path.write_text(f"{section}:\n  {name}: {text}\n")
            args = (str(path), [])
        else:
            args = (None, [f"{key}={text}"])
        with pytest.raises(ConfigError) as info:
            load_config(*args)
        assert f"{key}: 010 has a leading zero, which YAML reads as the octal number 8; write 10 without it" \
            in str(info.value)
    # a number without one, 0 itself, and 08 and 09 (no octal: YAML reads them as text, decimal here) read as written
    config = load_config(None, ["train.save_every=10", "train.seed=0", "train.steps=08", "data.seed=09"])
    assert (config.train.save_every, config.train.seed, config.train.steps, config.data.seed) == (10, 0, 8, 9)


@pytest.mark.parametrize("where", ["file", "override"])
def test_a_number_with_colons_is_refused_not_read_in_base_60(tmp_path, where):
    """YAML 1.1 reads 1:30 in base 60: `train.save_every_minutes=1:30` (a minute and a half?) checkpointed every 90
    minutes, and `train.seed: 1:20` drew seed 80, each without a word."""
    for key, text, value in (("train.save_every_minutes", "1:30", "90"), ("train.seed", "1:20", "80")):
        section, name = key.split(".")
        if where == "file":
            path = tmp_path / "run.yaml"
            path.write_text(f"{section}:\n  {name}: {text}\n")
            args, start = (str(path), []), f"--config {path}:2: "
        else:
            args, start = (None, [f"{key}={text}"]), f"{key}={text}: "
        with pytest.raises(ConfigError, match=f"^{start}{text} is a base-60 number to YAML \\({value}\\); write the "
                                              "number itself, or quote it if it is text$"):
            load_config(*args)


def test_a_bad_value_in_a_config_file_names_the_file_and_its_line(tmp_path):
    """A value out of bounds, of the wrong type or unread in a --config file was said without the file (or its
    line): `train.steps=0 must be >= 1` sent the user looking for an override they never gave. One an override sets
    is the override's, said as before."""
    path = tmp_path / "run.yaml"
    for text, key_line, message in (
            ("train:\n  lr: 0.1\n  steps: 0\n", 3, "train.steps=0 must be >= 1"),
            ("train:\n  lr: 1e-3x\n", 2, "train.lr: expected a number, got '1e-3x'"),
            ("model:\n  lora:\n    r: 0\n", 3, "model.lora.r=0 must be >= 1"),
            ("loss:\n  mode: grpo\n  w_reason: 2\n", 3, "loss.w_reason=2.0: loss.mode=grpo does not read it"),
            # PACTLossConfig's own check named the class, not the key, and so no line
            ("loss:\n  lambda_sft: 1\n  s_end: 0\n", 3, "loss.s_end=0.0 must be > 0"),
            ("trainer:\n  steps: 3\n", 1, "unknown key 'trainer'")):
        path.write_text(text)
        with pytest.raises(ConfigError) as info:
            load_config(str(path))
        assert str(info.value).startswith(f"--config {path}:{key_line}: {message}"), str(info.value)
    path.write_text("train:\n  steps: 0\n")
    with pytest.raises(ConfigError, match="^train.steps=-1 must be >= 1$"):
        load_config(str(path), ["train.steps=-1"])
    # a value the file cannot give at all (of the wrong type, an unknown key) is the file's, whatever an override
    # sets later: the override does not reach it, so the file is named
    for text, line, message, override in (
            ("train:\n  steps: abc\n", 2, "train.steps: expected an integer", "train.steps=3"),
            ("train:\n  stepz: 3\n", 2, "unknown key 'train.stepz'", "train.stepz=3")):
        path.write_text(text)
        with pytest.raises(ConfigError) as info:
            load_config(str(path), [override])
        assert str(info.value).startswith(f"--config {path}:{line}: {message}"), str(info.value)


def _from_stdin(code, text):
    """Run ``code`` in a fresh interpreter with ``text`` on its standard input, as ``--config /dev/stdin`` is
    read (a pipe: it holds the text for the first read only). Returns its stdout."""
    done = subprocess.run([sys.executable, "-c", code], input=text, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_config_from_a_pipe_is_read_once_and_used_whole():
    """A piped config that names a pretrained model was read a second time for the model's defaults, found empty,
    and trained the built-in model's defaults instead (model.path None, 300 steps) without a word; its error
    lines were lost the same way."""
    code = ("from pact_fast.config import ConfigError, load_config\n"
            "c = load_config('/dev/stdin', check_read=False)\n"
            "print(c.model.path, c.train.steps, c.train.out_dir)")
    text = "model:\n  path: HuggingFaceTB/SmolLM2-135M\ntrain:\n  steps: 7\n  out_dir: runs/piped\n"
    assert _from_stdin(code, text).split() == ["HuggingFaceTB/SmolLM2-135M", "7", "runs/piped"]
    code = ("from pact_fast.config import ConfigError, load_config\n"
            "try:\n    load_config('/dev/stdin')\nexcept ConfigError as exc:\n    print(exc)")
    text = "model:\n  path: HuggingFaceTB/SmolLM2-135M\ntrain:\n  steps: 0\n"
    assert _from_stdin(code, text).startswith("--config /dev/stdin:4: train.steps=0 must be >= 1")


def test_compare_reads_the_out_dir_a_piped_config_sets():
    """compare asked the file a second time whether it set train.out_dir: a pipe said no, and the comparison went
    to runs/compare instead of the config's directory."""
    code = ("from pact_fast import cli\n"
            "args = cli.build_parser().parse_args(['compare', '--config', '/dev/stdin'])\n"
            "c = cli._resolve(args, check_read=False)\n"
            "print(c.train.out_dir, cli._out_dir_given(args), cli._config_file_sets(args, 'train.seed'),"
            " cli._config_file_sets(args, 'rollout.seed'))")
    out = _from_stdin(code, "train:\n  out_dir: runs/piped\n  seed: 3\n")
    assert out.split() == ["runs/piped", "True", "True", "False"]
