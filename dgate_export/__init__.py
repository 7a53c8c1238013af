"""dgate-export: compile networks with decision gates into per-segment engines.

Importing the package is cheap and needs neither torch nor TensorRT; import the submodules you use
(`dgate_export.runtime` for deployment; `dgate_export.compile` for the torch side, the `[compile]` extra).
"""

__version__ = "0.1.0"

from .errors import UserError

__all__ = ["UserError", "__version__"]
