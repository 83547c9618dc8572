"""Sampling from the reverse process: the sampler and conditioning (:mod:`sedd.sampling.sampler`)
over the registered reverse-step predictors (:mod:`sedd.sampling.predictors`)."""

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

__all__ = [
    "DENOISERS", "PREDICTORS", "Predictor", "AnalyticPredictor", "EulerPredictor", "Denoiser",
    "check_eps", "conditioning", "get_predictor", "register_predictor", "sample",
]
