"""Triton kernels (installed as ``animatelcm.kernels``); import only through ``animatelcm.ops``, which decides
whether Triton can run here."""
