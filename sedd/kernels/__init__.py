"""Fused Triton kernels for SEDD. No autograd, no model code: :mod:`sedd.ops` is the public entry."""
