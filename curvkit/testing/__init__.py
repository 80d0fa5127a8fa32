"""Dense float64 references and operator checks (shipped so users and docs can use them too).

* :mod:`curvkit.testing.dense` -- explicit Jacobians, per-sample gradients and Fisher matrices
  computed with ``torch.func``, independent of curvkit's capture code;
* :mod:`curvkit.testing.compare` -- :func:`assert_operator_matches`, one helper that checks a
  :class:`~curvkit.linalg.LinearOperator` against an explicit matrix in every input format.
"""

from curvkit.testing.compare import assert_operator_matches
from curvkit.testing.dense import (
    KINDS,
    LIKELIHOODS,
    dense_block_diagonal,
    dense_fisher,
    output_fisher,
    per_sample_jacobians,
    per_sample_loss_gradients,
)

__all__ = [
    # dense ground truth
    "per_sample_jacobians",
    "output_fisher",
    "per_sample_loss_gradients",
    "dense_fisher",
    "dense_block_diagonal",
    "LIKELIHOODS",
    "KINDS",
    # operator checks
    "assert_operator_matches",
]
