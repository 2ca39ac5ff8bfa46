"""afie_fast: entropy-guided (AFIE) structural pruning of CNNs with a compiled core."""
from importlib.metadata import PackageNotFoundError, version as _version

from .accumulator import CovarianceAccumulator
from .calibration import recalibrate_bn
from .entropy import afie_from_spectrum, backend_info
from .report import AFIEReport, LayerScore
from .pruning import AFIEImportance, PruneStats, prune
from .saving import load_pruned, save_pruned
from .scoring import score
from .handlers import register_heads, register_split

try:
    __version__ = _version("afie_fast")
except PackageNotFoundError:  # pragma: no cover
    from ._ext import _C as _core

    __version__ = _core.__version__

__all__ = ["AFIEImportance", "AFIEReport", "CovarianceAccumulator", "LayerScore", "PruneStats", "afie_from_spectrum",
           "backend_info", "load_pruned", "prune", "recalibrate_bn", "register_heads", "register_split", "save_pruned",
           "score", "__version__"]
