"""Files that may be damaged: a reader's error said in one line; text and JSON written whole or not at all."""


def read_or_raise(read, error):
    """``read()``; an exception it raises because a file is damaged (cut short by a full disk, a copy in progress,
    another format: torch.load, safetensors, json, tokenizers and transformers each raise their own kinds) is
    raised as ``error(reason)``, ``reason`` being the exception's type and its first 300 characters on one line;
    the original stays chained (``--debug`` shows it). Running out of memory and a missing module are not the
    file's fault and pass through as they are."""
    import torch

    try:
        return read()
    except (MemoryError, ImportError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as exc:
        raise error(f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from exc


def write_text(path, text):
    """``text`` at ``path``, whole or not at all: written to a temporary file beside it, then renamed over it (a
    crash mid-write leaves the old file, or none, never a cut one; the temporary file goes with an error)."""
    import os

    tmp = f"{path}.{os.getpid()}.tmp"  # one per process: ranks writing the same file do not share it
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path, value):
    """``value`` as indented JSON at ``path``, whole or not at all (``write_text``)."""
    import json

    write_text(path, json.dumps(value, indent=1))
