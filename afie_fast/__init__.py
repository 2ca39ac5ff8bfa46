"""afie_fast: entropy-guided (AFIE) structural pruning of CNNs with a compiled core."""
from importlib.metadata import PackageNotFoundError, version as _version

from .accumulator import CovarianceAccumulator
from .entropy import afie_from_spectrum, backend_info
from .report import AFIEReport, LayerScore
from .scoring import score

try:
    __version__ = _version("afie_fast")
except PackageNotFoundError:  # pragma: no cover
    from ._ext import _C as _core

    __version__ = _core.__version__

__all__ = ["AFIEReport", "CovarianceAccumulator", "LayerScore", "afie_from_spectrum", "backend_info", "score",
           "__version__"]
