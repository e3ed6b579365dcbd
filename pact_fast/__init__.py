"""pact_fast: a fast, memory-lean PACT trainer (privileged trace co-training of tool-use agents)."""
__version__ = "0.1.0"
