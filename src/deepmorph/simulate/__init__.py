"""Fast, GalSim-accurate galaxy simulations in PyTorch (CPU or CUDA).

Main entry point: :class:`Simulator`. Building blocks: :class:`Renderer` (Fourier-space
rendering of :class:`Sersic` profiles and :class:`PointSources`), PSFs
(:func:`parse_psf`), survey presets (:func:`get_survey`), priors (:class:`Priors`) and noise
models. No Lightning, no networks here.
"""

from deepmorph.simulate.noise import BackgroundNoise, GaussianNoise, read_background
from deepmorph.simulate.priors import LABEL_NAMES, Priors, morphology_label
from deepmorph.simulate.profiles import sersic_b, sersic_profile
from deepmorph.simulate.psf import GaussianPSF, ImagePSF, MoffatPSF, parse_psf, read_psf_fits
from deepmorph.simulate.render import PointSources, Renderer, Sersic
from deepmorph.simulate.simulator import CATALOG_UNITS, Simulator, config_from_attributes
from deepmorph.simulate.surveys import SURVEYS, Survey, get_survey

__all__ = [
    "BackgroundNoise", "CATALOG_UNITS", "GaussianNoise", "GaussianPSF", "ImagePSF", "LABEL_NAMES",
    "MoffatPSF", "PointSources", "Priors", "Renderer", "SURVEYS", "Sersic", "Simulator", "Survey",
    "config_from_attributes", "get_survey", "morphology_label", "parse_psf", "read_background",
    "read_psf_fits", "sersic_b", "sersic_profile",
]
