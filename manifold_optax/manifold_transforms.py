"""Manifold transformations: the multiplier update ``dual_ascent`` and the ``retract`` step,
plus ``project_params`` and ``diagnostics`` (MATH.md §3).

Chain them as ``optax.chain(momentum(...), dual_ascent(m, ...), optax.scale_by_learning_rate(η),
retract(m))``; both need ``params`` in ``update``. Which leaf lives on which manifold comes from
a *manifold spec*: one :class:`Manifold` (applied to every leaf with at least two axes), a tree
prefix of ``Manifold | None``, or a callable ``params → such a tree``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from manifold_optax._matrix import as_matrix
from manifold_optax.labels import path_to_str
from manifold_optax.linalg import msign, singular_values
from manifold_optax.manifolds import (
    SOLVERS,
    Aux,
    Manifold,
    SolverConfig,
    SpectralSphere,
    Sphere,
    Stiefel,
    _apply_sym,
    _cubic,
    _inverse_gradient_scale,
    _quintic,
)
from manifold_optax.sharding import replicate, run_replicated
from manifold_optax.transforms import leaf_specs

__all__ = [
    "by_shape",
    "DualAscentState",
    "RetractState",
    "dual_ascent",
    "retract",
    "resolve_manifolds",
    "project_params",
    "diagnostics",
    "DEFAULT_INIT_TOLERANCE",
]

#: Relative distance to the manifold above which ``init`` refuses the parameters.
DEFAULT_INIT_TOLERANCE = 1e-4

_is_manifold = lambda x: isinstance(x, Manifold)


def resolve_manifolds(spec, tree) -> list:
    """One ``Manifold | None`` per leaf of ``tree`` (``jax.tree.leaves`` order), validated.

    A single ``Manifold`` applies to leaves with at least two axes (vectors and scalars get
    ``None``). A tree prefix or callable may also give ``Sphere`` to a vector; giving
    ``Stiefel``/``SpectralSphere`` to a 0-D/1-D leaf, or an integer/complex leaf to any
    manifold, raises ValueError naming the leaf's path.
    """
    leaves_with_paths = jax.tree_util.tree_flatten_with_path(tree)[0]
    if _is_manifold(spec):
        out = [spec if jnp.ndim(x) >= 2 else None for _, x in leaves_with_paths]
    else:
        try:
            out = leaf_specs(spec, tree, is_spec=_is_manifold)
        except ValueError as e:
            raise ValueError(f"manifold spec does not match the parameter tree: {e}") from e
    for (path, x), m in zip(leaves_with_paths, out, strict=True):
        if m is None:
            continue
        if not _is_manifold(m):
            raise ValueError(
                f"manifold spec for {path_to_str(path)!r} must be a Manifold or None, got {m!r}"
            )
        m.check_leaf(x, path_to_str(path))
    return out


def by_shape(factory, *, min_ndim: int = 2):
    """A manifold spec that builds each matrix leaf's manifold from its fans.

    ``factory(fan_in, fan_out)`` returns a ``Manifold`` or ``None``; fans are the last two axes
    (Flax's ``(in, out)``). The usual shape-aware choices (modula, the Spectral Sphere
    Optimizer) keep activations O(1) whatever the width:

    * ``SpectralSphere(√(fan_out/fan_in))`` — unit RMS→RMS operator norm;
    * ``Sphere(√fan_out)`` — entries of RMS ``1/√fan_in``, like LeCun-normal initialization
      (radius 1 on a 256×256 matrix would give entries ≈ 1/256);
    * ``Stiefel()`` is already shape-aware for square and wide/tall layers (norm-preserving).
    """

    def spec(params):
        return jax.tree.map(
            lambda x: factory(x.shape[-2], x.shape[-1]) if jnp.ndim(x) >= min_ndim else None,
            params,
        )

    return spec


def _paths(tree):
    return [path_to_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _empty():
    return None  # an empty pytree: no zero-size arrays (orbax cannot save those)


def _flat_batch(x, nb: int):
    """``x`` (or None) with its ``nb`` leading batch axes flattened into one."""
    return None if x is None else x.reshape((-1,) + x.shape[nb:])


def group_default(group: bool | None) -> bool:
    """``None``: stack same-shape leaves on GPU/TPU (fewer, larger kernels), not on CPU, where
    the copies into and out of the stacks cost more than they save (reference tree, 2 cores:
    Stiefel 92 ms per leaf against 143 ms grouped; sphere 60 against 73)."""
    return jax.default_backend() != "cpu" if group is None else bool(group)


def run_grouped(fn, items: list, group: bool = True) -> list:
    """Run ``fn(key, *arrays)`` once per group of items with equal ``key``.

    ``items`` holds ``(key, arrays)`` with every array (or None) leading with the item's batch
    axis; a group's arrays are concatenated along it, ``fn`` runs on the stack (one batched
    msign / power iteration / polish instead of one per leaf: same-shape layers share every
    kernel, issue 6), and the outputs (a tuple of such arrays or None) are split back.
    """
    groups: dict = {}
    for i, (key, _) in enumerate(items):
        groups.setdefault(key if group else i, []).append(i)
    out: list = [None] * len(items)
    for idx in groups.values():
        key = items[idx[0]][0]
        if len(idx) == 1:
            args = items[idx[0]][1]
            if args[0].shape[0] != 1:
                out[idx[0]] = fn(key, *args)
                continue
            # A lone matrix runs unbatched (XLA:CPU runs batch-1 dots slower than plain ones).
            res = fn(key, *(None if a is None else a[0] for a in args))
            out[idx[0]] = tuple(None if r is None else r[None] for r in res)
            continue
        cols = zip(*(items[i][1] for i in idx), strict=True)
        stacked = [None if xs[0] is None else jnp.concatenate(xs, axis=0) for xs in cols]
        res = fn(key, *stacked)
        start = 0
        for i in idx:
            b = items[i][1][0].shape[0]
            out[i] = tuple(None if r is None else r[start : start + b] for r in res)
            start += b
    return out


class LeafState(NamedTuple):
    y: Any  # multiplier (normalized-gradient units): [*batch] or [*batch, m, m]; None off-manifold
    v: Any  # spectral sphere: warm power block [*batch, min(rows, cols), p]; else None


class DualAscentState(NamedTuple):
    leaves: tuple  # one LeafState per parameter leaf (empty arrays where no manifold)


class RetractState(NamedTuple):
    v: tuple  # spectral sphere: power-iteration vectors per leaf (empty elsewhere)


def _check_concrete_on_manifold(params, manifolds, tol):
    if tol is None:
        return
    for (path, x), m in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], manifolds, strict=True
    ):
        if m is None or isinstance(x, jax.core.Tracer):
            continue
        d = float(m.distance(as_matrix(jnp.asarray(x))))
        # Low-precision parameters cannot sit closer than their rounding (bf16: ~4e-3).
        tol_eff = max(tol, 4 * float(jnp.finfo(jnp.result_type(x)).eps))
        if not d <= tol_eff:
            raise ValueError(
                f"parameter {path_to_str(path)!r} is off its manifold {m} (relative distance "
                f"{d:.3g} > {tol_eff:g}); put it on the manifold first with "
                "manifold_optax.project_params(params, manifold_spec)"
            )


def _solver_config(solver, exact_config, inner_steps, dual_learning_rate) -> SolverConfig:
    """The validated solver options shared by ``dual_ascent`` and ``manifold_step``."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; accepted: {SOLVERS}")
    return dataclasses.replace(
        exact_config or SolverConfig(),
        inner_steps=inner_steps,
        dual_learning_rate=dual_learning_rate,
    )


def _matrix_items(g_leaves, w_leaves, manifolds, state_leaves, state_arrays):
    """``(items, where)`` for :func:`run_grouped`: per manifold leaf ``i`` (listed in
    ``where``), ``(key, (G, W, y, v, ...))`` in float32 with one flat batch axis, where
    ``state_arrays(m, W, leaf_state)`` gives ``(y, v, ...)``; the key groups leaves with the
    same manifold, matrix shape and block shape."""
    items, where = [], []
    for i, (g, w, m, ls) in enumerate(
        zip(g_leaves, w_leaves, manifolds, state_leaves, strict=True)
    ):
        if m is None:
            continue
        W = as_matrix(w.astype(jnp.float32))
        G = as_matrix(g.astype(jnp.float32)).reshape(W.shape)
        nb = W.ndim - 2
        args = tuple(_flat_batch(x, nb) for x in (G, W, *state_arrays(m, W, ls)))
        key = (m, args[1].shape[1:], None if args[3] is None else args[3].shape[1:])
        items.append((key, args))
        where.append(i)
    return items, where


def _initial_leaves(manifold, params, init_tolerance, power_iters) -> list:
    """Per leaf, ``None`` off-manifold, else ``(y, aux)``: a zero multiplier and the
    auxiliary state (spectral sphere: a cold-started power block and its top pair). Checks
    that concrete parameters lie on their manifolds."""
    manifolds = resolve_manifolds(manifold, params)
    _check_concrete_on_manifold(params, manifolds, init_tolerance)
    out = []
    for x, m in zip(jax.tree.leaves(params), manifolds, strict=True):
        if m is None:
            out.append(None)
            continue
        W = as_matrix(jnp.asarray(x, jnp.float32))
        y = jnp.zeros(m.multiplier_shape(W.shape), jnp.float32)
        out.append((y, m.update_aux(W, m.init_aux(W), power_iters)))
    return out


def dual_ascent(
    manifold,
    solver: str = "online",
    *,
    dual_learning_rate: float | None = None,
    inner_steps: int = 20,
    ns_steps: int | None = None,
    ns_coeffs="polar_express",
    compute_dtype=None,
    exact_config: SolverConfig | None = None,
    init_tolerance: float | None = DEFAULT_INIT_TOLERANCE,
    sharding=None,
    group: bool | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Per manifold leaf, the steepest tangent direction ``Φ = msign(G + C_W*(Y))`` and the
    multiplier update; the multiplier ``Y`` lives in the state.

    Solvers (MATH.md §3): ``"online"`` — one dual step per training step (Su, part 5):
    ``Φ = msign(Ĝ + C_W*(Y))``, ``Y ← Y − η₂·C_W(Φ)``, one msign, ``Ĝ = G/RMS-σ(G)``;
    ``"dual_ascent"`` — ``inner_steps`` such steps (with a linearly decaying step) warm-started
    from the state; ``"exact"`` / ``"fixed_point"`` — solved to ``exact_config.tol`` (see
    :class:`~manifold_optax.manifolds.Manifold`). Leaves without a manifold pass through.
    Returns the positive direction ``Φ`` (``optax.scale_by_learning_rate`` negates it).

    Args:
      manifold: a Manifold, a tree prefix of ``Manifold | None``, or a callable returning one.
      solver: one of ``"online"``, ``"dual_ascent"``, ``"exact"``, ``"fixed_point"``.
      dual_learning_rate: ``η₂``, in units of the normalized gradient; ``None`` takes the
        manifold's default (0.5 for the spheres, 0.1 for Stiefel: measured fastest-stable).
      inner_steps: dual steps per call for ``"dual_ascent"``.
      ns_steps, ns_coeffs: the msign of the online / dual-ascent directions (default 5 Polar
        Express steps, as ``muon``).
      compute_dtype: dtype of the online solver's msign matmuls (e.g. ``jnp.bfloat16``, as in
        :func:`~manifold_optax.muon`: coefficients, normalization and accumulation stay
        float32); ``None`` computes in float32. The multiplier update, the tangent projection
        and the retraction always run in float32, so parameters stay on their manifolds to
        float32 accuracy. The iterative solvers (``"dual_ascent"``, ``"exact"``,
        ``"fixed_point"``) keep float32: accuracy is what they are for.
      exact_config: options of the exact solvers.
      init_tolerance: ``init`` raises if a concrete parameter is farther than this (relative;
        at least 4× the dtype's epsilon, so bfloat16 parameters get ~0.03) from its manifold;
        the check is skipped for traced parameters; ``None`` disables it.
      sharding: a :class:`~manifold_optax.sharding.MsignSharding` for sharded parameters.
      group: run same-shape leaves (with the same manifold) as one batch: one msign, one
        power iteration; ``None`` does so except on CPU (see :func:`group_default`). Results
        agree with one leaf at a time to float32 round-off.
    """
    cfg = _solver_config(solver, exact_config, inner_steps, dual_learning_rate)
    ms_kwargs = dict(steps=ns_steps, coeffs=ns_coeffs, compute_dtype=compute_dtype)

    def init_fn(params):
        leaves = _initial_leaves(manifold, params, init_tolerance, cfg.power_iters)
        return DualAscentState(
            tuple(
                LeafState(_empty(), _empty()) if leaf is None else LeafState(leaf[0], leaf[1].v)
                for leaf in leaves
            )
        )

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("dual_ascent needs params: call update(updates, state, params)")
        manifolds = resolve_manifolds(manifold, params)
        g_leaves, treedef = jax.tree.flatten(updates)
        w_leaves = jax.tree.leaves(params)
        items, where = _matrix_items(
            g_leaves, w_leaves, manifolds, state.leaves, lambda m, W, ls: (ls.y, ls.v)
        )

        def group_step(key, G, W, y, v):
            m = key[0]
            if solver == "online" and isinstance(m, Sphere):
                # Sharded parameters, sphere: everything is elementwise or a scalar reduction
                # except the msign, whose input is gathered once (MATH.md §4).
                phi, y = _online_step(m, G, W, y, m.theta(W), cfg, ms_kwargs, sharding)
                return phi, y, v

            def leaf_step(G, W, y, v):
                if solver == "online":
                    aux = m.update_aux(W, Aux(v), cfg.power_iters)
                    if isinstance(m, SpectralSphere):
                        # Θ = uvᵀ is never formed (SpectralSphere.online_dual_step).
                        eta = m.dual_step_size(cfg)
                        phi, y, zero = m.online_dual_step(G, W, y, aux, eta, _msign_fn(ms_kwargs))
                        # A zero gradient has no steepest direction: step nowhere.
                        phi = jnp.where(zero[..., None, None], 0.0, phi)
                    else:
                        phi, y = _online_step(m, G, W, y, m.theta(W, aux), cfg, ms_kwargs)
                else:
                    phi, y, aux = m.solve(G, W, solver, Y=y, aux=Aux(v), config=cfg)
                return phi, y, aux.v

            # Otherwise gather W and G once and compute whole matrices on every device
            # (shard_map): GSPMD would split the power / polar iterations into many small
            # collectives (measured: more bytes than gathering).
            return run_replicated(leaf_step, sharding, G, W, y, v)

        new_u, new_s = list(g_leaves), list(state.leaves)
        for i, (phi, y, v) in zip(
            where, run_grouped(group_step, items, group_default(group)), strict=True
        ):
            w, ls = w_leaves[i], state.leaves[i]
            new_u[i] = phi.reshape(w.shape).astype(w.dtype)
            new_s[i] = LeafState(
                y.reshape(ls.y.shape), None if v is None else v.reshape(ls.v.shape)
            )
        return jax.tree.unflatten(treedef, new_u), DualAscentState(tuple(new_s))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _msign_fn(ms_kwargs, sharding=None):
    """The dual step's msign: with ``sharding``, its input is gathered once and the whole
    matrix is computed on every device."""

    def msign_fn(Z):
        return replicate(msign(replicate(Z, sharding), **ms_kwargs), sharding)

    return msign_fn


def _online_step(m: Manifold, G, W, Y, theta, cfg: SolverConfig, ms_kwargs, sharding=None):
    """One msign: ``Φ = msign(Ĝ + C*(Y))``, then ``Y ← Y − η₂·C(Φ)`` (``Ĝ = G/RMS-σ(G)``; see
    :meth:`Manifold.dual_step`: Stiefel returns ``Φ`` projected onto the tangent space, reusing
    ``C(Φ)``, and takes the closed form when square). With ``sharding`` (spheres),
    ``Ĝ + C*(Y)`` is formed where the parameter lives (elementwise), gathered once for the
    msign, and the residual is a local product plus a scalar all-reduce. Returns ``(Φ, Y)``.
    """
    zero, inv_scale = _inverse_gradient_scale(G)  # zero: [*batch]
    Gn = G * inv_scale[..., None, None]
    eta = m.dual_step_size(cfg)
    phi, y = m.dual_step(Gn, W, Y, theta, eta, _msign_fn(ms_kwargs, sharding))
    # A zero gradient has no steepest direction: step nowhere, keep the multiplier.
    phi = jnp.where(zero[..., None, None], 0.0, phi)
    if Y is not None:  # (square Stiefel's closed form needs no multiplier in)
        y = jnp.where(zero.reshape(zero.shape + (1,) * (y.ndim - zero.ndim)), Y, y)
    return phi, y


def _update_to(new, w, dtype):
    """The update that moves parameter ``w`` to the point ``new`` (any shape of ``w``'s size),
    in the update's ``dtype``."""
    return (new.reshape(w.shape).astype(w.dtype) - w).astype(dtype)


#: The polish plan (``Stiefel.polish_plan``'s ``A, 1/c, cubic_ok, quintic_ok``) of a leaf
#: that is not a Stiefel leaf.
NO_PLAN = (None,) * 4


class PendingPolish(NamedTuple):
    """A Stiefel leaf waiting for its retraction's polish step (:func:`_stiefel_updates`)."""

    index: int  # the leaf's index in the update list
    manifold: Stiefel
    V: jax.Array  # [b, rows, cols] float32: the point before the retraction, W − ηΦ
    A: jax.Array  # [b, m, m]: its normalized Gram (Stiefel.polish_plan)
    inv_c: jax.Array  # [b, 1, 1]: 1/c, the Gram's normalization
    cubic_ok: jax.Array  # [b] bool: one cubic step is float32-accurate
    quintic_ok: jax.Array  # [b] bool: one quintic step is
    param: jax.Array  # the parameter W
    dtype: Any  # the update's dtype


def _stiefel_updates(
    pending: list[PendingPolish], out: list, sharding=None, group: bool = False
) -> None:
    """Write the updates ``R(V) − W`` of the Stiefel leaves into ``out``: one polish step each,
    ``X = V·p(A)/c`` (:meth:`Stiefel.polish_plan`), with the cubic ``p`` if it is certified
    for every matrix of the step, else the quintic; and only if the quintic too falls short
    for some matrix, the fallback (``Stiefel.retract(V, exact=False)``: the polish loop, or
    the full msign for a far-off ``V``) for just those matrices.

    Two conditionals for the whole step, not a switch per matrix (24 on the reference tree):
    on GPU, XLA reads each conditional's predicate back to the host. The first holds only the
    m×m factors ``p(A)/c`` (the quintic's ``A²`` is what it saves), so the n×m×m products run
    outside any conditional: on 2 CPU cores a conditional around them made the Stiefel step
    8% slower (1.57× → 1.68× ``muon``). Same-shape leaves polish as one batch when ``group``
    (see :func:`run_grouped`)."""
    if not pending:
        return
    cubic_all = jnp.all(jnp.stack([jnp.all(p.cubic_ok) for p in pending]))
    quintic_all = jnp.all(jnp.stack([jnp.all(p.quintic_ok) for p in pending]))
    factors = jax.lax.cond(
        cubic_all,
        lambda As: [_cubic(A) * s for A, s in As],
        lambda As: [_quintic(A) * s for A, s in As],
        [(p.A, p.inv_c) for p in pending],
    )
    items = [((p.manifold, p.V.shape[1:]), (p.V, P)) for p, P in zip(pending, factors, strict=True)]
    xs = [
        X
        for (X,) in run_grouped(
            lambda key, V, P: (run_replicated(_apply_sym, sharding, V, P),), items, group
        )
    ]

    def fallback(arrays):
        news = []
        for p, (X, V) in zip(pending, arrays, strict=True):
            R = run_replicated(lambda V, m=p.manifold: m.retract(V, exact=False), sharding, V)
            news.append(jnp.where(p.quintic_ok.reshape(p.quintic_ok.shape + (1, 1)), X, R))
        return news

    arrays = [(X, p.V) for X, p in zip(xs, pending, strict=True)]
    # (The fallback runs only when the quintic was taken: under the cubic every matrix is ok.)
    ok_all = cubic_all | quintic_all
    news = jax.lax.cond(ok_all, lambda a: [X for X, _ in a], fallback, arrays)
    for X, p in zip(news, pending, strict=True):
        out[p.index] = _update_to(X, p.param, p.dtype)


def retract(
    manifold, *, power_iters: int = 6, sharding=None, group: bool | None = None
) -> optax.GradientTransformationExtraArgs:
    r"""Return ``R(W + u) − W`` for every manifold leaf, so that ``optax.apply_updates`` lands
    exactly on the manifold; goes last in a chain (after the learning rate).

    Retractions: ``Sphere`` ``r·V/‖V‖_F``; ``SpectralSphere`` ``r·V/‖V‖₂`` with ``‖V‖₂`` the
    Ritz value (refined by two checked power steps) of a warm-started block after a
    degree-``power_iters`` Chebyshev filter (see
    :func:`~manifold_optax.linalg.top_singular_subspace`; on the digits demo 6 keep the
    layers within 4.4e-7 of ``r`` at every step); ``Stiefel`` the polar factor of ``V``, by
    normalizing with the RMS singular value and quintic Newton–Schulz polishing (``V`` is within
    O(η²) of orthonormal after a tangent step), in float32 at HIGHEST matmul precision. Leaves
    without a manifold pass through. bfloat16 parameters are retracted in float32 and rounded.
    ``sharding`` and ``group`` as in :func:`dual_ascent`.
    """

    def init_fn(params):
        manifolds = resolve_manifolds(manifold, params)
        vs = []
        for x, m in zip(jax.tree.leaves(params), manifolds, strict=True):
            if m is None:
                vs.append(_empty())
            else:
                W = as_matrix(jnp.asarray(x, jnp.float32))
                vs.append(m.update_aux(W, m.init_aux(W), power_iters).v)
        return RetractState(tuple(vs))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("retract needs params: call update(updates, state, params)")
        manifolds = resolve_manifolds(manifold, params)
        u_leaves, treedef = jax.tree.flatten(updates)
        w_leaves = jax.tree.leaves(params)
        items, where = [], []
        for i, (u, w, m, v) in enumerate(zip(u_leaves, w_leaves, manifolds, state.v, strict=True)):
            if m is None:
                continue
            V = as_matrix(w.astype(jnp.float32) + u.astype(jnp.float32))
            nb = V.ndim - 2
            args = (_flat_batch(V, nb), _flat_batch(v, nb))
            items.append(((m, args[0].shape[1:], None if v is None else args[1].shape[1:]), args))
            where.append(i)

        def group_retract(key, V, v):
            m = key[0]
            if isinstance(m, Sphere):
                # A norm and a rescale: stays sharded (one scalar all-reduce).
                return m.retract(V), v, *NO_PLAN

            def leaf_retract(V, v):
                if isinstance(m, SpectralSphere):
                    aux = m.update_aux(V, Aux(v), power_iters)
                    return m.retract(V, aux), aux.v, *NO_PLAN
                if isinstance(m, Stiefel):
                    return V, v, *m.polish_plan(V)
                return m.retract(V), v, *NO_PLAN

            # Block power iteration / the polar polish's Gram on whole matrices (see
            # dual_ascent).
            return run_replicated(leaf_retract, sharding, V, v)

        grouped = group_default(group)
        out, vs, pending = list(u_leaves), list(state.v), []
        for i, (new, v, *plan) in zip(
            where, run_grouped(group_retract, items, grouped), strict=True
        ):
            w, u = w_leaves[i], u_leaves[i]
            if plan[0] is not None:  # Stiefel: polished below, all leaves together
                pending.append(PendingPolish(i, manifolds[i], new, *plan, w, u.dtype))
            else:
                out[i] = _update_to(new, w, u.dtype)
            vs[i] = None if v is None else v.reshape(state.v[i].shape)
        _stiefel_updates(pending, out, sharding, grouped)
        return jax.tree.unflatten(treedef, out), RetractState(tuple(vs))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def project_params(params, manifold_spec):
    """Put (freshly initialized) parameters onto their manifolds: spheres rescale, Stiefel takes
    the polar factor (the nearest point). Leaves without a manifold are returned unchanged."""
    manifolds = resolve_manifolds(manifold_spec, params)
    leaves, treedef = jax.tree.flatten(params)
    out = []
    for x, m in zip(leaves, manifolds, strict=True):
        if m is None:
            out.append(x)
            continue
        W = as_matrix(jnp.asarray(x, jnp.float32))
        if isinstance(m, SpectralSphere):
            s = singular_values(W)[..., 0]
            new = m.radius * W / jnp.where(s > 0, s, 1.0)[..., None, None]
        elif isinstance(m, Stiefel):
            new = m.retract(W, exact=True)
        else:
            new = m.retract(W)
        out.append(new.reshape(jnp.shape(x)).astype(jnp.result_type(x)))
    return jax.tree.unflatten(treedef, out)


def _find_states(tree, cls):
    found = []

    def visit(x):
        if isinstance(x, cls):
            found.append(x)
            return True
        return False

    jax.tree.leaves(tree, is_leaf=visit)
    return found


def diagnostics(params, manifold_spec, opt_state=None, directions=None) -> dict:
    """Per manifold leaf (keyed by path): ``distance`` to the manifold, and if given, the
    ``multiplier_norm`` (from the ``dual_ascent`` state inside ``opt_state``) and the relative
    ``tangent_violation`` of ``directions`` (e.g. the ``dual_ascent`` output). Call it outside
    ``jit`` for logging, or inside and log the arrays."""
    manifolds = resolve_manifolds(manifold_spec, params)
    leaves = jax.tree.leaves(params)
    paths = _paths(params)
    states = []
    if opt_state is not None:
        # The fused manifold_step state carries the same multiplier and block per leaf.
        from manifold_optax.manifold_step import ManifoldStepState

        states = _find_states(opt_state, DualAscentState) + _find_states(
            opt_state, ManifoldStepState
        )
    d_leaves = jax.tree.leaves(directions) if directions is not None else None
    out = {}
    for i, (p, x, m) in enumerate(zip(paths, leaves, manifolds, strict=True)):
        if m is None:
            continue
        W = as_matrix(jnp.asarray(x, jnp.float32))
        entry = {"distance": m.distance(W)}
        if states and len(states[0].leaves) == len(leaves):
            entry["multiplier_norm"] = jnp.linalg.norm(states[0].leaves[i].y)
        if d_leaves is not None:
            phi = jnp.asarray(d_leaves[i], jnp.float32).reshape(W.shape)
            aux = None
            if isinstance(m, SpectralSphere) and states:
                aux = Aux(states[0].leaves[i].v)  # the block (refined from W itself)
            entry["tangent_violation"] = jnp.max(m.tangent_violation(W, phi, aux))
        out[p] = entry
    return out
