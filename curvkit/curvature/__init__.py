"""(model, loss, batch) -> immutable :class:`Curvature` snapshots built from linalg operators."""

from curvkit.curvature import fisher as _fisher_structures  # noqa: F401  (registers structures)
from curvkit.curvature.base import FISHER_FORMULAS, Curvature
from curvkit.curvature.build import BuildContext, fisher, register_structure, structures

# isort: split
from curvkit.curvature import kfac as _kfac  # noqa: F401  (registers "kfac", "foof")

# isort: split
from curvkit.curvature import diag as _diag  # noqa: F401  (registers "diag")

__all__ = ["Curvature", "fisher", "register_structure", "structures", "BuildContext",
           "FISHER_FORMULAS"]
