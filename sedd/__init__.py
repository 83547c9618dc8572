"""Score Entropy Discrete Diffusion: graphs, noise schedules, the DDiT model, losses, samplers
and the likelihood bound, on top of the fused kernels behind :mod:`sedd.ops`.

Text in, text out::

    from sedd import load_pretrained, generate
    p = load_pretrained("out")                  # a checkpoint directory (train/run.py) or Hub id
    generate(p, ["Once upon a time", "The"], length=64)
"""

__version__ = "0.1.0"

__all__ = ["generate", "generate_samples", "load_pretrained", "Pretrained"]

# Resolved on first use, so `import sedd.graph` (or the kernels) does not pull in the model,
# the tokenizers and the sampler.
_LAZY = {
    "generate": "sedd.generation",
    "generate_samples": "sedd.generation",
    "load_pretrained": "sedd.pretrained",
    "Pretrained": "sedd.pretrained",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sedd' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
