"""The loss curve of a tiny run matches the stored one (tests/data/loss_curve.json), so a change that alters
training fails here. When the change is meant to alter training, regenerate the file (see tests/loss_curve.py):

    python tests/loss_curve.py
"""
import json

import pytest
from loss_curve import KEYS, OVERRIDES, STORED, run_curve


def test_loss_curve_matches_the_stored_one(tmp_path):
    stored = json.loads(STORED.read_text())
    assert stored["overrides"] == OVERRIDES, "tests/loss_curve.py changed its run: regenerate the stored curve"
    curve = run_curve(tmp_path)
    assert [row["step"] for row in curve] == list(range(1, 21))
    for got, want in zip(curve, stored["steps"]):
        for key in KEYS:
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), (got["step"], key)
