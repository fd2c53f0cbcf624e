"""rotaq: graph rewriting for structured compression of trained neural networks.

Public API: :func:`load`, :func:`optimize`, :class:`Recipe`, :class:`Model`, :func:`inspect`,
:func:`generate`.
Backends (ONNX Runtime, TVM) are imported lazily.
"""

from rotaq.api import OptimizeResult, optimize
from rotaq.errors import RotaqError
from rotaq.generate import generate  # the function; the module stays rotaq.generate in imports
from rotaq.inspect import inspect
from rotaq.loading import load
from rotaq.model import Model
from rotaq.recipe import Recipe
from rotaq.version import __version__

__all__ = [
           "Model",
           "OptimizeResult",
           "Recipe",
           "RotaqError",
           "__version__",
           "generate",
           "inspect",
           "load",
           "optimize",
]
