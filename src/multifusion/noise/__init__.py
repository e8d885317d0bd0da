"""Where models meet after each model's classifier-free guidance: noise combiners.

Each combiner is a noise function ``(x_t, t, record=None) -> eps`` built from other noise
functions, so combiners nest (a region painted by a fusion of two models needs no extra code).
"""

from multifusion.noise.average import Average, weighted_average
from multifusion.noise.regions import Canvas, Region, gaussian_weights, mix, quartic_weights, region_weights
from multifusion.noise.snb import SNB, blend, blend_mask, salience, spatial_softmax

__all__ = [
    "SNB",
    "Average",
    "Canvas",
    "Region",
    "blend",
    "blend_mask",
    "gaussian_weights",
    "mix",
    "quartic_weights",
    "region_weights",
    "salience",
    "spatial_softmax",
    "weighted_average",
]
