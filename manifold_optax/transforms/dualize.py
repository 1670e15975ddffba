"""``dualize``: every leaf mapped to its steepest direction under a chosen norm."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from manifold_optax import norms as _norms
from manifold_optax._matrix import grouped_msign, matrix_view, vector_view
from manifold_optax._placement import placed
from manifold_optax.labels import path_to_str
from manifold_optax.transforms._leaves import leaf_specs, msign_kwargs, paths

__all__ = ["dualize"]


def dualize(
    norm: str = "spectral",
    weight_dimension_numbers=None,
    *,
    ns_steps: int | None = None,
    ns_coeffs="polar_express",
    normalization: str = "schatten8",
    precision=None,
    compute_dtype=None,
    group: bool | None = None,
    ns_method: str = "auto",
    sharding=None,
) -> optax.GradientTransformation:
    r"""Map every leaf to its steepest direction ``dualize(g) = argmax_{‖t‖=1} ⟨g, t⟩``.

    ``norm`` is one of ``"spectral"``, ``"frobenius"``, ``"sign"``, ``"rms"``, ``"row"``,
    ``"column"`` (table in :mod:`manifold_optax.norms`), or a tree prefix of such names (or a
    callable returning one) to choose per leaf. Matrix norms view leaves as
    ``[batch, fan_in, fan_out]`` (see :func:`orthogonalize`); 0-D and 1-D leaves count as
    ``(1, d)`` matrices (a bias is the weight of a constant input), for which ``spectral`` is
    ℓ2 normalization and ``rms`` scales to unit RMS. Frobenius and sign act on whole leaves.

    Args:
      norm: a norm name or a tree prefix of names (or a callable returning one).
      weight_dimension_numbers: the matrix view of each leaf, as in :func:`orthogonalize`.
      ns_steps: Newton–Schulz steps of the spectral and RMS norms' msign (as in
        :func:`orthogonalize`).
      ns_coeffs: the msign's schedule (as in :func:`orthogonalize`).
      normalization: the msign's normalization (as in :func:`orthogonalize`).
      precision: the msign's matmul precision (as in :func:`orthogonalize`).
      compute_dtype: the msign's matmul input dtype (as in :func:`orthogonalize`).
      group: batching of same-shape matrices (as in :func:`orthogonalize`).
      ns_method: the Newton–Schulz method (as in :func:`orthogonalize`).
      sharding: the many-device strategy (as in :func:`orthogonalize`).

    Returns:
      A stateless ``optax.GradientTransformation``.

    Example:
      >>> import jax.numpy as jnp, manifold_optax as mo
      >>> tx = mo.dualize("frobenius")
      >>> u, _ = tx.update({"w": jnp.array([[3.0, 4.0]])}, tx.init(None))
      >>> u["w"].tolist()
      [[0.6000000238418579, 0.800000011920929]]

    References:
      Bernstein & Newhouse, "Old Optimizer, New Norm" (arXiv:2409.20325); ``docs/math.md``
      (Steepest descent under a norm).
    """
    is_name = lambda x: isinstance(x, str)
    if is_name(norm):
        _norms.check_norm(norm)
    kw = msign_kwargs(ns_steps, ns_coeffs, normalization, precision, 1e-8, compute_dtype, ns_method)

    def update_fn(updates, state, params=None):
        del params
        leaves, treedef = jax.tree.flatten(updates)
        names = leaf_specs(norm, updates, is_spec=is_name)
        specs = leaf_specs(weight_dimension_numbers, updates)
        leaf_paths = paths(updates)
        new = list(leaves)
        spectral_views, spectral_meta = [], []
        for i, (g, name, s, p) in enumerate(zip(leaves, names, specs, leaf_paths, strict=True)):
            if name is None:
                continue
            if name not in _norms.NORMS:
                raise ValueError(
                    f"unknown norm {name!r} for {path_to_str(p)!r}; accepted: {_norms.NORMS}"
                )
            if name in ("frobenius", "sign"):
                new[i] = _norms.dualize_array(name, g)
                continue
            v, inv = matrix_view(g, s, p) if g.ndim >= 2 else vector_view(g)
            if name in ("spectral", "rms"):
                spectral_views.append(v)
                spectral_meta.append((i, inv, name, v.shape[1], v.shape[2]))
            else:
                new[i] = inv(_norms.dualize_array(name, v))
        outs = grouped_msign(spectral_views, group=group, sharding=sharding, **kw)
        for o, (i, inv, name, d_in, d_out) in zip(outs, spectral_meta, strict=True):
            if name == "rms":
                o = o * jnp.asarray(math.sqrt(d_out / d_in), o.dtype)
            new[i] = inv(o)
        return jax.tree.unflatten(treedef, new), state

    return placed(
        optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn), sharding
    )
