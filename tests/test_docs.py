"""docs/method.md cites the line of pact_fast/losses.py that computes each equation; keep them true.

After editing losses.py, `python tests/test_docs.py` re-points the links (CITED says what each one shows)."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# What each cited line computes, in the order the links appear in docs/method.md.
CITED = [
    "def group_advantages(",
    "return (centered / (std[inv] + eps)).to(out_dtype)",
    "def clipped_surrogate_tokens(",
    "ratio = torch.exp(log_ratio)",
    "loss = torch.maximum(loss_unclipped, loss_clipped)",
    "loss = torch.where(adv < 0, torch.minimum(loss, bound), loss)",
    "def aggregate(",
    'den = batch.old_logp_tc if config.ctx_den == "same" else behavior',
    "def sft_loss(",
    "per_trace = (-(sft_logp * weights",
    "def sft_token_weights(",
    "def reasoning_segments_kept(",
    "def tool_call_weight(",
    "token_loss = torch.where(per_rollout[:, None], po[0], tc[0])",
    "def anchor_draws(",
    "token_loss = (1.0 - config.anchor_q) * tc[0] + config.anchor_q * po[0]",
    "def pact_loss(",
    "total = total + rl_scale * l_rl",
    "total = total + rl_scale * config.beta_kl * kl",
    "def kl_penalty(",
    "return torch.exp(neg) - neg - 1.0",
    "total = total - rl_scale * config.c_ent * ent",
    "total = total + sft_scale * config.lambda_sft * l_sft",
    "kl_tokens = kl_tokens * po[1]",
    "use_rl, use_sft = progress >= config.switch_progress",
    'use_rl, use_sft, rl_kind = mode != "sft"',
]


def test_method_md_cites_the_lines_that_compute_each_equation():
    doc = (ROOT / "docs" / "method.md").read_text()
    source = (ROOT / "pact_fast" / "losses.py").read_text().splitlines()
    cited = [int(n) for n in re.findall(r"losses\.py#L(\d+)", doc)]
    assert len(cited) == len(CITED), "a link was added to or removed from docs/method.md: update CITED"
    stale = []
    for k, (line, code) in enumerate(zip(cited, CITED)):
        if code not in source[line - 1]:
            where = [i + 1 for i, text in enumerate(source) if code in text]
            stale.append(f"link {k + 1} cites line {line}; {code!r} is at line(s) {where}")
    assert not stale, "\n".join(stale)


def repoint_method_md():
    """Rewrite docs/method.md's line numbers to where CITED's code now is (``python tests/test_docs.py``)."""
    path = ROOT / "docs" / "method.md"
    source = (ROOT / "pact_fast" / "losses.py").read_text().splitlines()
    codes = iter(CITED)

    def repoint(match):
        code = next(codes)
        where = [i + 1 for i, text in enumerate(source) if code in text]
        if len(where) != 1:
            raise SystemExit(f"{code!r} is on lines {where} of losses.py; make CITED's entry unique")
        return f"[{match.group(1)}{where[0]}](../pact_fast/losses.py#L{where[0]})"

    text = re.sub(r"\[((?:losses\.py:|line )?)\d+\]\(\.\./pact_fast/losses\.py#L\d+\)", repoint, path.read_text())
    path.write_text(text)


if __name__ == "__main__":
    repoint_method_md()


def _readme_block(after):
    """The first ```python block of README.md after the line ``after``."""
    text = (ROOT / "README.md").read_text()
    start = text.index(after)
    block = text.index("```python\n", start) + len("```python\n")
    return text[block:text.index("```", block)]


def test_readmes_pact_loss_snippet_runs_on_grpo_layout_tensors():
    """README's pact_loss snippet, as written, on what a GRPO trainer holds: verl's uid is an object array of
    strings (a snippet passing it as group_ids failed with an AttributeError); the snippet's group ids give the
    advantages of those groups."""
    import numpy as np
    import torch

    from pact_fast.losses import REASONING, TOOL_CALL, group_advantages

    g = torch.Generator().manual_seed(0)
    B, T, S, E = 6, 5, 2, 4
    logp = (-torch.rand(B, T, generator=g, dtype=torch.float64)).requires_grad_()
    old = logp.detach() - 0.1 * torch.rand(B, T, generator=g, dtype=torch.float64)
    space = {"uid": np.array(["q7", "q3", "q7", "q3", "q9", "q9"], dtype=object),
             "response_mask": torch.ones(B, T), "rewards": torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0]),
             "logp": logp, "old_logp": old, "logp_tc": logp, "old_logp_tc": old,
             "trace_logp": (-torch.rand(S, E, generator=g, dtype=torch.float64)).requires_grad_(),
             "components": torch.tensor([[REASONING, REASONING, TOOL_CALL, TOOL_CALL]] * S),
             "segment_ids": torch.zeros(S, E, dtype=torch.long), "turn_ids": torch.zeros(S, E, dtype=torch.long),
             "step": 3, "total_steps": 10}
    exec(_readme_block("### The loss inside verl, TRL or OpenRLHF"), space)
    assert space["group_ids"].tolist() == [1, 0, 1, 0, 2, 2]
    torch.testing.assert_close(space["batch"].group_ids, space["group_ids"])
    assert torch.isfinite(space["loss"]) and space["metrics"]["loss/sft"] > 0
    # the advantages are those of the uid groups (each one success, one failure), not of one group of six
    by_uid = group_advantages(space["rewards"], torch.tensor([1, 0, 1, 0, 2, 2])).abs().mean().item()
    assert space["metrics"]["adv_abs_mean"] == pytest.approx(by_uid)
    assert by_uid != pytest.approx(group_advantages(space["rewards"], torch.zeros(B, dtype=torch.long)).abs().mean().item())


def _config_defaults():
    """``{"section.key": default}`` of every config key."""
    import dataclasses

    from pact_fast.config import Config

    def walk(obj, prefix):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                yield from walk(value, f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}", value
    return dict(walk(Config(), ""))


SECTIONS = ("model", "data", "rollout", "loss", "train", "scoring")


def test_every_config_key_readme_names_exists():
    """A `section.key` in README's code spans is a config key (a module path such as `pact_fast.scoring.x` is not
    one: the lookbehind leaves it out)."""
    keys = _config_defaults()
    text = (ROOT / "README.md").read_text()
    named = set()
    for span in re.findall(r"`([^`\n]+)`", text):
        for key in re.findall(rf"(?<![\w./-])((?:{'|'.join(SECTIONS)})\.[a-z_][a-z_0-9.]*[a-z_0-9])", span):
            named.add(key)
    unknown = sorted(k for k in named if k not in keys and not any(x.startswith(k + ".") for x in keys))
    assert not unknown, f"README names config keys that do not exist: {unknown}"
    assert len(named) > 50


def _table_value(text):
    """A README table cell's default as Python: true/false, None, [] and [1], numbers, else the text."""
    text = text.strip().strip("`")
    if text in ("true", "false"):
        return text == "true"
    if text == "None":
        return None
    if text.startswith("["):
        return tuple(_table_value(x) for x in text[1:-1].split(",") if x.strip())
    try:
        return float(text)
    except ValueError:
        return text


def test_readmes_main_options_table_gives_the_config_defaults():
    """Each row of README's "Main options" table: its keys exist and its defaults are the config's
    (``.r`` after ``model.lora.enabled`` is ``model.lora.r``; one default for several keys is each one's)."""
    defaults = _config_defaults()
    text = (ROOT / "README.md").read_text()
    table = text[text.index("Main options (sections"):]
    rows = re.findall(r"^\| (`.*?) \| (.*?) \| .* \|$", table[:table.index("\n\n", table.index("| key |"))], re.M)
    assert len(rows) > 20
    wrong = []
    for key_cell, default_cell in rows:
        keys, prefix = [], None
        for k in re.findall(r"`([^`]+)`", key_cell):
            if k.startswith("."):
                k = prefix + k
            prefix = k.rsplit(".", 1)[0]
            keys.append(k)
        values = [v for v in re.split(r",\s*(?![^\[]*\])", default_cell)]
        if len(values) == 1:
            values = values * len(keys)
        assert len(values) == len(keys), f"row {key_cell}: {len(keys)} keys, {len(values)} defaults"
        for k, v in zip(keys, values):
            if k not in defaults:
                wrong.append(f"{k}: no such key")
                continue
            want, got = defaults[k], _table_value(v)
            if isinstance(want, tuple):
                want = tuple(float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else x for x in want)
            elif isinstance(want, (int, float)) and not isinstance(want, bool):
                want = float(want)
            if got != want:
                wrong.append(f"{k}: README says {v.strip()}, the config's default is {defaults[k]!r}")
    assert not wrong, "\n".join(wrong)


def _readme_commands():
    """``(words, whole)`` of each ``pact-fast`` command in README: the lines of its ```bash blocks (whole: a
    command to parse as given) and its inline code spans (a fragment: only its sub-command and option names)."""
    import shlex

    text = (ROOT / "README.md").read_text()
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            for part in re.split(r"\s&&\s", re.sub(r"\s+#\s.*$", "", line)):
                part = re.sub(r"^(\w+=\S*\s+)+", "", part.strip())  # PYTHONPATH=. pact-fast ...
                part = re.sub(r"^torchrun\s.*?-m pact_fast\s", "pact-fast ", part)
                if part.startswith("pact-fast "):
                    found.append((shlex.split(part)[1:], True))
    for span in re.findall(r"`(pact-fast [^`\n]+)`", text):
        found.append((shlex.split(span.replace("...", ""))[1:], False))
    return found


def test_readmes_pact_fast_commands_parse():
    """Every ``pact-fast`` command README shows: its sub-command and options exist (a whole command in a ```bash
    block parses as written, with no argparse error), and its ``section.key=value`` overrides name config keys."""
    from pact_fast import cli

    keys = _config_defaults()
    parser = cli.build_parser()
    subs = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction)).choices
    commands = _readme_commands()
    assert len(commands) > 20
    bad = []
    for words, whole in commands:
        shown = "pact-fast " + " ".join(words)
        if not words or words[0] not in subs:
            bad.append(f"{shown}: no such sub-command")
            continue
        options = {s for a in subs[words[0]]._actions for s in a.option_strings}
        bad += [f"{shown}: {w} is not an option of {words[0]}" for w in words
                if w.startswith("--") and w.split("=")[0] not in options]
        bad += [f"{shown}: {w.split('=')[0]} is not a config key" for w in words
                if re.match(rf"({'|'.join(SECTIONS)})\.", w) and "=" in w and w.split("=")[0] not in keys]
        if whole:
            try:
                args = cli._parse(parser, words)
            except SystemExit:
                bad.append(f"{shown}: argparse refuses it")
                continue
            # a fresh train or compare (no run or file to read): its options and overrides make a valid config
            if words[0] in ("train", "compare") and not (getattr(args, "resume", None) or args.config):
                try:
                    cli._resolve(args)
                except ValueError as exc:
                    bad.append(f"{shown}: {exc}")
    assert not bad, "\n".join(bad)


def test_every_sub_command_says_what_it_does_in_its_own_help():
    """``pact-fast SUB --help`` starts with the line ``pact-fast --help`` lists for SUB (demo, plot, export, config,
    fetch-model and plan showed a bare usage line)."""
    import argparse

    from pact_fast import cli

    parser = cli.build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    listed = {c.dest: c.help for c in subs._choices_actions}
    assert set(listed) == set(subs.choices)
    bare = [name for name, p in subs.choices.items() if not listed[name] or p.description != listed[name]]
    assert not bare, f"sub-commands whose --help lacks their description: {bare}"


def test_readme_installs_extras_from_the_checkout():
    """The package is not on PyPI under this name: an extra is installed as ``pip install -e '.[extra]'`` (README
    said ``pip install 'pact_fast[lora]'``, which asks the package index)."""
    text = (ROOT / "README.md").read_text()
    assert not re.findall(r"pip install[^\n`]*?['\"]?pact[_-]fast\[", text)


def test_the_files_and_python_names_readme_cites_exist():
    """Every repository path README cites in code spans (`bench/results/x.json`, `pact_fast/task_inputs.py`) is a
    file here, and every `pact_fast.module.name` it cites imports."""
    import importlib

    text = (ROOT / "README.md").read_text()
    paths = set(re.findall(r"`([\w./-]+/[\w.-]+\.(?:py|json|png|md|sh|yaml))`", text))
    paths |= set(re.findall(r"\]\(([\w./-]+\.(?:md|png|json))\)", text))
    assert len(paths) > 20
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    names = set(re.findall(r"`(pact_fast(?:\.[A-Za-z_]\w*)+)", text))
    assert len(names) > 15
    for name in sorted(names):
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:i]))
                break
            except ImportError:
                continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                missing.append(name)
                break
            obj = getattr(obj, attr)
    assert not missing, f"README cites what does not exist: {missing}"
