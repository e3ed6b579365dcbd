"""Packaging: a non-editable install ships every subpackage (setup.py lists them by hand), the repository's
``kernels/`` folder is ``pact_fast.kernels`` and never the top-level ``kernels`` (Hugging Face's), and a built
wheel works in a fresh virtualenv."""
import ast
import importlib.metadata
import shutil
import subprocess
import sys
import sysconfig
import zipfile
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
            if top == "pact_fast" and parts[:1] == ("kernels",):  # a link to ../kernels that older checkouts made
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


def _python(code, *, cwd, args=(), env=None, timeout=120):
    """Run ``python [args] -c code`` in ``cwd`` (``-c`` puts ``cwd`` first on sys.path, as a user's shell at the
    repository root does); returns the completed process."""
    return subprocess.run([sys.executable, *args, "-c", code], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_repository_root_first_on_sys_path_keeps_hugging_face_kernels():
    """``kernels/`` at the repository root must never be the top-level ``kernels``: transformers and TRL import
    Hugging Face's ``kernels`` (transformers >= 5.25 requires it), and ``python -m``/``-c``/pytest/notebooks at
    the root put the root first on sys.path."""
    code = ("import sys, kernels, pact_fast.kernels as ours\n"
            "from pact_fast.kernels import registry\n"
            "import trl.trainer.grpo_trainer\n"
            "print(repr(sys.path[0]), kernels.__file__, ours.__file__, registry.__file__, sep='\\n')")
    proc = _python(code, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, theirs, ours, registry = proc.stdout.split("\n")[:4]
    assert first == "''", "python -c puts the working directory (the repository root) first"
    assert Path(theirs).resolve().parent != ROOT / "kernels" and "site-packages" in Path(theirs).parts, theirs
    assert importlib.metadata.version("kernels"), "Hugging Face's kernels must be installed for this test"
    assert Path(ours).resolve() == ROOT / "kernels" / "__init__.py"
    assert Path(registry).resolve() == ROOT / "kernels" / "registry.py"


def test_python_dash_m_pact_fast_runs_from_the_repository_root():
    proc = subprocess.run([sys.executable, "-m", "pact_fast", "demo"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "=== one episode of an untrained tiny model" in proc.stdout


def test_kernels_folder_is_not_importable_where_no_other_kernels_exists(tmp_path):
    """Without site-packages (``-S``) there is no Hugging Face ``kernels``: the top-level import fails as if the
    folder were absent, and ``pact_fast.kernels`` (which needs nothing installed) still imports; a ``kernels``
    later on sys.path is the one ``import kernels`` gives."""
    code = ("import sys; sys.path[:0] = [{root!r}] + {extra!r}\n"
            "import pact_fast.kernels as k; print(k.__name__)\n"
            "try:\n    import kernels\nexcept ModuleNotFoundError as e:\n    print('absent', e.name)\n"
            "else:\n    print('found', kernels.__file__, kernels.MARK)\n")
    proc = _python(code.format(root=str(ROOT), extra=[]), cwd=tmp_path, args=("-S",))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["pact_fast.kernels", "absent", "kernels"]
    other = tmp_path / "elsewhere" / "kernels"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("MARK = 'other'\n")
    proc = _python(code.format(root=str(ROOT), extra=[str(other.parent)]), cwd=tmp_path, args=("-S",))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["pact_fast.kernels", "found", str(other / "__init__.py"), "other"]


def test_wheel_installs_into_a_fresh_virtualenv_and_runs_the_demo(tmp_path):
    """``pip wheel . --no-deps`` from a copy of the sources; the wheel goes into a new virtualenv whose
    dependencies come from this interpreter's site-packages (a .pth file), and ``pact-fast demo`` runs there
    with no source tree on the path; from the repository root the checkout's own package is the one imported
    and still finds its kernels."""
    src = tmp_path / "src"  # a copy, so the build's build/ and *.egg-info stay out of the checkout
    shutil.copytree(ROOT / "kernels", src / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "pact_fast", src / "pact_fast", ignore=shutil.ignore_patterns("__pycache__", "kernels"))
    for name in ("setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    wheels = tmp_path / "wheels"
    run = dict(capture_output=True, text=True, timeout=600)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "-q", "-w", str(wheels)],
                          cwd=src, **run)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (wheel,) = wheels.glob("pact_fast-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    assert {"pact_fast/kernels/__init__.py", "pact_fast/kernels/tree_attention.py"} <= names
    assert not any(n.startswith("kernels/") for n in names), "the wheel must not ship a top-level kernels"

    venv = tmp_path / "venv"
    proc = subprocess.run([sys.executable, "-m", "venv", str(venv)], **run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          **run).stdout.strip()
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(site, "_outer_dependencies.pth").write_text("\n".join(sorted(deps)) + "\n")
    proc = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], **run)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    where = tmp_path / "elsewhere"
    where.mkdir()
    proc = subprocess.run([str(venv / "bin" / "pact-fast"), "demo"], cwd=where, **run)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "=== task multihop-" in proc.stdout and "=== one episode of an untrained tiny model" in proc.stdout
    assert "finish=" in proc.stdout.splitlines()[-1], proc.stdout[-2000:]
    code = "import pact_fast.kernels as k, pact_fast; print(pact_fast.__file__); print(k.__file__)"
    installed = subprocess.run([str(python), "-c", code], cwd=where, **run)
    assert installed.returncode == 0, installed.stderr[-2000:]
    assert all(Path(p).is_relative_to(site) for p in installed.stdout.split()), installed.stdout
    at_root = subprocess.run([str(python), "-c", code], cwd=ROOT, **run)
    assert at_root.returncode == 0, at_root.stderr[-2000:]
    assert [Path(p).resolve() for p in at_root.stdout.split()] == [ROOT / "pact_fast" / "__init__.py",
                                                                     ROOT / "kernels" / "__init__.py"]
