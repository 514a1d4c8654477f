"""Jitted Triton kernels of prefix-attn and their autotune configs.

Nothing here validates its inputs: the launchers in ``prefix_attn`` do that first.
Import order is one way: ``csrc_triton`` never imports ``prefix_attn``.
"""
