"""ntkdyn: predict neural-network training from the Neural Tangent Kernel."""

from ntkdyn._version import __version__
from ntkdyn import models
from ntkdyn.linearize import linearize
from ntkdyn.ntk import empirical_ntk
