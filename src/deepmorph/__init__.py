"""deepmorph: deep learning on galaxy images.

Fast, GalSim-accurate galaxy simulations (:mod:`deepmorph.simulate`), HDF5 datasets
(:mod:`deepmorph.data`) and reports (:mod:`deepmorph.report`); see the README.
"""

__version__ = "0.1.0"
