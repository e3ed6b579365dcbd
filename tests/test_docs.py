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
             "trace_logp": -torch.rand(S, E, generator=g, dtype=torch.float64),
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
