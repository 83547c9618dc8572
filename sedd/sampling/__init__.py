"""Sampling from the reverse process: how to sample, in one value (:class:`SamplingSpec`,
:mod:`sedd.sampling.spec`), the sampler and conditioning (:mod:`sedd.sampling.sampler`)
over the registered reverse-step predictors (:mod:`sedd.sampling.predictors`, and the first-hitting
sampler, :mod:`sedd.sampling.first_hitting`), the network calls and their cache
(:mod:`sedd.sampling.cache`); ancestral sampling of the autoregressive baseline
(:mod:`sedd.sampling.ancestral`); block by block with a KV cache for a block-diffusion model
(:mod:`sedd.sampling.block`)."""

from sedd.sampling.ancestral import sample_ancestral
from sedd.sampling.block import BlockSamplingStats, sample_block_diffusion
from sedd.sampling.cache import SamplingStats
from sedd.sampling.first_hitting import FirstHittingPredictor
from sedd.sampling.predictors import (
    DENOISERS,
    PREDICTORS,
    AnalyticPredictor,
    Denoiser,
    EulerPredictor,
    Predictor,
    get_predictor,
    register_predictor,
)
from sedd.sampling.sampler import check_eps, conditioning, sample
from sedd.sampling.spec import SamplingOptionError, SamplingSpec

__all__ = [
    "DENOISERS", "PREDICTORS", "Predictor", "AnalyticPredictor", "EulerPredictor", "Denoiser",
    "BlockSamplingStats", "FirstHittingPredictor", "SamplingOptionError", "SamplingSpec", "SamplingStats", "check_eps",
    "conditioning", "get_predictor", "register_predictor", "sample", "sample_ancestral", "sample_block_diffusion",
]
