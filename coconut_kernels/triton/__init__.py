"""Triton kernels (GPU; CPU under TRITON_INTERPRET=1), one module per op."""
