"""Saving a :class:`~curvkit.laplace.LaplacePosterior`: its state as plain tensors.

The state holds the layer-space operator ``n·F`` (:func:`curvkit.linalg.state.operator_state`),
``θ_MAP``, the prior and the scaled batch log-likelihood (when computed); it round-trips through
``torch.save`` / ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from curvkit.linalg.state import operator_from_state, operator_state

STATE_VERSION = 1


def state(post) -> dict:
    """The state of ``post`` (module doc).

    Args:
        post: the posterior.

    Returns:
        A dict of tensors, strings and numbers.
    """
    prior = post.prior
    return {"version": STATE_VERSION, "structure": post.structure, "kind": post.kind,
            "likelihood": post.likelihood, "num_data": post.num_data,
            "batch_size": post.batch_size, "num_params": post.num_params, "mean": post.mean,
            "prior": prior.diag if prior.kind == "diagonal" else prior.value,
            "operator": operator_state(post.precision), "log_likelihood": post._loglik}


def load(post, s: dict) -> None:
    """Restore ``s`` into ``post`` (same model and structure).

    Args:
        post: the posterior to restore into.
        s: a :func:`state` of a posterior with the same model and structure.

    Raises:
        ValueError: the state is of another version, structure or parameter count.
    """
    if s.get("version") != STATE_VERSION:
        raise ValueError(f"state version {s.get('version')!r} is not {STATE_VERSION}")
    for key, mine in (("structure", post.structure), ("num_params", post.num_params)):
        if s[key] != mine:
            raise ValueError(f"the state is for {key}={s[key]!r} but this posterior has "
                             f"{key}={mine!r}; build a LaplacePosterior of the same model and "
                             "structure")
    post.num_data, post.batch_size = int(s["num_data"]), int(s["batch_size"])
    post.mean = s["mean"].to(post.mean)
    post._theta_layer = post._to_layer(post.mean.to(post._theta_layer.dtype))
    post.precision = operator_from_state(s["operator"])
    post._loglik = s["log_likelihood"]
    post.prior_precision = s["prior"]
