"""The DDiT score network of SEDD (:class:`SEDD`, in :mod:`sedd.model.ddit`), its blocks
(:mod:`sedd.model.layers`), attention backends (:mod:`sedd.model.attention`), checkpoint files
(:mod:`sedd.model.checkpoint`), and how samplers and losses read scores from it
(:mod:`sedd.model.scoring`)."""

from sedd.model.ddit import ATTN_BACKENDS, FLASH_ATTN_AVAILABLE, PRESETS, SEDD, apply_rotary, sigma_embedding

__all__ = ["ATTN_BACKENDS", "FLASH_ATTN_AVAILABLE", "PRESETS", "SEDD", "apply_rotary", "sigma_embedding"]
