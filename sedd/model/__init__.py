"""The DDiT score network of SEDD (:class:`SEDD`, in :mod:`sedd.model.ddit`), the autoregressive
baseline on the same trunk (:class:`ARModel`, in :mod:`sedd.model.ar`), block diffusion on it
(:class:`BlockSEDD`, in :mod:`sedd.model.block`), their blocks
(:mod:`sedd.model.layers`), attention backends (:mod:`sedd.model.attention`), checkpoint files
(:mod:`sedd.model.checkpoint`), and how samplers and losses read scores from a SEDD model
(:mod:`sedd.model.scoring`)."""

from sedd.model.ar import ARModel
from sedd.model.block import BlockSEDD
from sedd.model.ddit import ATTN_BACKENDS, FLASH_ATTN_AVAILABLE, PRESETS, SEDD, apply_rotary, sigma_embedding

__all__ = ["ARModel", "ATTN_BACKENDS", "BlockSEDD", "FLASH_ATTN_AVAILABLE", "PRESETS", "SEDD", "apply_rotary", "sigma_embedding"]
