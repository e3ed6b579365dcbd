"""A non-editable install must ship every subpackage: setup.py lists packages by hand."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_setup_lists_every_subpackage():
    setup = (ROOT / "setup.py").read_text()
    packages = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "pact_fast").rglob("__init__.py")}
    missing = sorted(p for p in packages | {"pact_fast.kernels"} if f'"{p}"' not in setup)
    assert not missing, f"setup.py packages= lacks {missing}"
