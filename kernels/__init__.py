"""Triton kernels of pact_fast, importable as ``pact_fast.kernels``.

setup.py maps this folder into the package, and ``pact_fast/__init__.py`` does the same for a
source checkout. The folder sits at the repository root, which ``python -m``, ``python -c``, pytest
and notebooks put first on ``sys.path``; there Python finds it under the top-level name ``kernels``,
which belongs to Hugging Face's kernels package (transformers imports it). When this file runs
under that name it loads, in its own place, the ``kernels`` that the rest of ``sys.path`` provides,
or fails with ModuleNotFoundError as if this folder were not there: ``import kernels`` never yields
this folder.
"""
if __name__ != "pact_fast.kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    def _load_elsewhere(name: str):
        """Import ``name`` from every sys.path entry but the one holding this folder; the loaded
        module replaces this one in sys.modules, which the import system then returns."""
        here = os.path.dirname(os.path.realpath(__file__))
        checkout = os.path.dirname(here)
        path = [p for p in sys.path if os.path.realpath(p or os.curdir) != checkout]
        for finder in sys.meta_path:
            if finder is importlib.machinery.PathFinder:
                spec = finder.find_spec(name, path)
            elif hasattr(finder, "find_spec"):
                spec = finder.find_spec(name, None)
            else:
                continue
            if spec is None or spec.loader is None or spec.origin is None:
                continue
            if os.path.dirname(os.path.realpath(spec.origin)) != here:
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                spec.loader.exec_module(module)
                return
        raise ModuleNotFoundError(f"No module named {name!r} (the repository's kernels/ folder is "
                                  f"pact_fast.kernels, not a top-level module)", name=name)

    if __name__ != "kernels":
        raise ImportError(f"pact_fast's kernels folder was imported as {__name__!r}: import pact_fast.kernels")
    _load_elsewhere(__name__)
