"""pact_fast: a fast, memory-lean PACT trainer (privileged trace co-training of tool-use agents)."""
import os as _os

__version__ = "0.1.0"


def _map_checkout_kernels() -> None:
    """In a source checkout the Triton kernels live in ``kernels/`` beside this package; setup.py
    installs them as ``pact_fast.kernels``. When this package is imported from the checkout itself
    (its root first on sys.path, as ``python -m`` puts it), point ``pact_fast.kernels`` at that folder,
    so the checkout works alike with an editable install, a wheel installed elsewhere, or none."""
    import importlib.util
    import sys

    package = _os.path.dirname(_os.path.abspath(__file__))
    folder = _os.path.join(_os.path.dirname(package), "kernels")
    init = _os.path.join(folder, "__init__.py")
    if _os.path.isdir(_os.path.join(package, "kernels")) or not _os.path.isfile(init):
        return
    spec = importlib.util.spec_from_file_location(__name__ + ".kernels", init, submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)


_map_checkout_kernels()
