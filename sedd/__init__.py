"""Score Entropy Discrete Diffusion: graphs, noise schedules, the DDiT model, losses, samplers
and the likelihood bound, on top of the fused kernels behind :mod:`sedd.ops`."""

__version__ = "0.1.0"
