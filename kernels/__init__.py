"""Triton kernels of pact_fast, importable as ``pact_fast.kernels`` (this folder is mapped
into the package by setup.py; it is never a top-level ``kernels`` module)."""
