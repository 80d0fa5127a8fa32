"""Pure tensor algebra: the operator contract and the small operators structures are built from.

No ``nn.Module``, no hooks, no data here.
"""

from curvkit.linalg.blockdiag import BlockDiagonal
from curvkit.linalg.cholesky import SPDFactor, batched_psd_sqrt, batched_spd_solve, damped_cholesky
from curvkit.linalg.compose import InverseOperator
from curvkit.linalg.dense import Dense
from curvkit.linalg.diagonal import Diagonal
from curvkit.linalg.kronecker import Kronecker, pi_damping
from curvkit.linalg.lowrank import DenseFactor, LowRankFactor, ScaledFactor, StackedFactor
from curvkit.linalg.memory import available_memory_bytes, check_memory
from curvkit.linalg.onehot import OneHotFactor
from curvkit.linalg.operator import DampingError, LinearOperator, SingularError
from curvkit.linalg.outer import OuterProductFactor
from curvkit.linalg.woodbury import Woodbury

__all__ = [
    "LinearOperator", "InverseOperator", "SingularError", "check_memory", "available_memory_bytes",
    "damped_cholesky", "SPDFactor", "batched_psd_sqrt", "batched_spd_solve", "DampingError",
    "Woodbury", "LowRankFactor", "DenseFactor", "StackedFactor", "ScaledFactor", "OuterProductFactor",
    "OneHotFactor",
    "BlockDiagonal", "Diagonal", "Dense", "Kronecker", "pi_damping",
]
