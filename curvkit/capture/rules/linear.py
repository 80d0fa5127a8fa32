"""Rule for ``nn.Linear`` on inputs of any layout ``(N, *, d)``.

``W̃ = [W | b]`` acts on the input row at every location ``t`` (``T`` = product of the middle
dimensions, 1 for ``(N, d)``): ``a_{nt} = [x_{nt}, 1]``, ``e_{mt} = ∂⟨seed_m, f⟩/∂s_{nt}``. The
base :class:`~curvkit.capture.rules.base.LayerAdapter` is this rule.
"""

from __future__ import annotations

from curvkit.capture.rules.base import LayerAdapter


class LinearAdapter(LayerAdapter):
    """``nn.Linear``: the base rule."""
