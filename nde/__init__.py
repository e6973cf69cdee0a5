"""nde: neural differential equations in PyTorch."""

from ._path import AbstractPath
from ._terms import AbstractTerm, ControlTerm, MultiTerm, ODETerm

__version__ = "0.1.0"
