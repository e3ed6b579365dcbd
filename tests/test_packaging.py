"""A non-editable install must ship every subpackage: setup.py lists packages by hand."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup_keywords():
    """The literal keyword arguments of the ``setup(...)`` call in setup.py."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "setup")
    return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords
            if kw.arg in ("packages", "package_dir")}


def _packages_on_disk():
    """Every directory with an ``__init__.py``: ``pact_fast`` and its subpackages, and ``kernels`` (shipped as
    ``pact_fast.kernels``)."""
    found = set()
    for top, name in (("pact_fast", "pact_fast"), ("kernels", "pact_fast.kernels")):
        for init in (ROOT / top).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / top).parts
            if top == "pact_fast" and parts[:1] == ("kernels",):  # the development symlink to ../kernels
                continue
            found.add(".".join((name, *parts)))
    return found


def test_setup_lists_every_subpackage():
    kw = _setup_keywords()
    listed = set(kw["packages"])
    on_disk = _packages_on_disk()
    assert not on_disk - listed, f"setup.py packages= lacks {sorted(on_disk - listed)}"
    assert not listed - on_disk, f"setup.py packages= names missing packages {sorted(listed - on_disk)}"


def test_package_dir_maps_kernels_to_the_top_level_directory():
    package_dir = _setup_keywords()["package_dir"]
    assert package_dir.get("pact_fast.kernels") == "kernels"
    for package, directory in package_dir.items():
        assert (ROOT / directory / "__init__.py").is_file(), (package, directory)
