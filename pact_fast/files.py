"""Reading a file that may be damaged: what its reader raises, said in one line."""


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
