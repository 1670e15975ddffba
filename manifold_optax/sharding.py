"""Many devices: a deliberate msign strategy for sharded matrices, state shardings, and a
collective-bytes counter read from compiled HLO (``docs/math.md``, Many devices).

Left to GSPMD, Newton–Schulz on a sharded matrix turns each step's Gram product into an
all-reduce. The strategy is chosen on purpose instead:

* ``"gather"`` (default; Moonlight's ZeRO-1 Muon): each sharded matrix is all-gathered once,
  every device runs the whole msign / dual step / retraction on it, and the result is sliced
  back to the parameter's sharding (slicing moves no bytes). Traffic ≈ one all-gather of the
  gradient momentum per matrix (manifold leaves also gather ``W``).
* ``"owner"`` (modded-nanogpt / layer-sharded Megatron): same-shape matrices are stacked,
  the stack padded to a multiple of the device count and split, so each device computes
  whole matrices — muon's msign, a manifold's direction, dual step and retraction — with no
  collective inside (:meth:`MsignSharding.run_owned`); the results come back in the
  parameters' layout. Per-device work ``⌈B/N⌉`` matrices of a group of ``B``.
* ``"none"``: no constraints (GSPMD decides; for comparison).

Usage: ``strategy = MsignSharding(mesh)`` and pass ``sharding=strategy`` to ``muon``,
``manifold_muon``, ``orthogonalize``, ``dualize``, ``dual_ascent`` or ``retract``. Updates and
state follow the parameters' shardings by themselves (Explicit mesh axes, or Auto ones with a
strategy or a current mesh); :func:`state_shardings` gives the same shardings for ``jit``'s
``in_shardings``/``out_shardings`` where nothing names the mesh.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from manifold_optax._placement import auto_mesh, state_specs
from manifold_optax.labels import path_to_str

__all__ = [
    "MsignSharding",
    "STRATEGIES",
    "state_shardings",
    "collective_bytes",
    "replicate",
    "run_replicated",
    "run_placed",
    "owns",
]

STRATEGIES = ("gather", "owner", "none")


@dataclasses.dataclass(frozen=True, eq=False)
class MsignSharding:
    """How matrix functions run on sharded matrices: ``strategy`` over ``mesh``'s ``axes``."""

    mesh: Mesh
    strategy: str = "gather"
    axes: tuple[str, ...] | None = None  # mesh axes to split stacks over ("owner"); default all

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; accepted: {STRATEGIES}")
        if not isinstance(self.mesh, Mesh | jax.sharding.AbstractMesh):
            raise ValueError(
                f"MsignSharding needs the mesh the parameters are sharded over (a "
                f"jax.sharding.Mesh), got {self.mesh!r}"
            )
        for a in self.axes or ():
            if a not in self.mesh.axis_names:
                raise ValueError(
                    f"owner axis {a!r} is not an axis of the mesh (axes: {self.mesh.axis_names})"
                )

    def check_params(self, params):
        """ValueError naming the axis and the parameter's path if a parameter is sharded
        (a concrete array's ``NamedSharding``, or its type's) over an axis this mesh does
        not have."""
        for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
            sh = getattr(x, "sharding", None) if not isinstance(x, jax.core.Tracer) else None
            spec = getattr(sh, "spec", None) if isinstance(sh, NamedSharding) else None
            if spec is None:
                spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
            for entry in spec or ():
                for a in entry if isinstance(entry, tuple) else (entry,):
                    if a is not None and a not in self.mesh.axis_names:
                        raise ValueError(
                            f"parameter {path_to_str(path)!r} is sharded over axis "
                            f"{a!r}, which the strategy's mesh does not have (axes: "
                            f"{self.mesh.axis_names})"
                        )

    @property
    def owner_axes(self):
        return tuple(self.axes) if self.axes is not None else tuple(self.mesh.axis_names)

    @property
    def n_owner(self):
        return math.prod(self.mesh.shape[a] for a in self.owner_axes)

    def replicated(self, x):
        if self.strategy == "none":
            return x
        return jax.lax.with_sharding_constraint(x, NamedSharding(auto_mesh(self.mesh), P()))

    def _mapped(self, f, spec, args, local_args):
        """``f`` under a ``shard_map`` whose every input and output has ``spec``;
        ``local_args`` are the per-device shapes of ``args`` (for the outputs' structure)."""
        specs = lambda tree: jax.tree.map(lambda _: spec, tree)  # noqa: E731
        g = jax.shard_map(
            f,
            mesh=auto_mesh(self.mesh),
            in_specs=specs(args),
            out_specs=specs(jax.eval_shape(f, *local_args)),
            check_vma=False,
        )
        return g(*args)

    def run_replicated(self, f, *args):
        """Run ``f`` on whole (gathered) arrays on every device: a ``shard_map`` whose inputs and
        outputs are all replicated, so nothing inside can be re-sharded behind our back (one
        all-gather per input at the boundary; slicing the outputs back is free)."""
        if self.strategy == "none":
            return f(*args)
        return self._mapped(f, P(), args, args)

    def run_owned(self, f, *args):
        """Run ``f`` on a stack of whole matrices split over the owner axes: every array of
        ``args`` (arrays, ``None`` or pytrees) leads with the stack axis, of length ``B``;
        the stack is padded to a multiple of the owner count with copies of its first
        matrix, a ``shard_map`` gives each device its ``⌈B/n⌉`` matrices (``f`` computes
        them with no collective), and the outputs (leading with the same axis) come back
        split over the owners, without the padding. ``"gather"``: :meth:`run_replicated`."""
        if self.strategy != "owner":
            return self.run_replicated(f, *args)
        n = self.n_owner
        B = jax.tree.leaves(args)[0].shape[0]
        pad = -B % n
        if pad:
            args = jax.tree.map(
                lambda a: jnp.concatenate([a, jnp.repeat(a[:1], pad, axis=0)], axis=0), args
            )
        axes = self.owner_axes if len(self.owner_axes) > 1 else self.owner_axes[0]
        local = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct((a.shape[0] // n,) + a.shape[1:], a.dtype), args
        )
        out = self._mapped(f, P(axes), args, local)
        return jax.tree.map(lambda r: r[:B], out) if pad else out


def replicate(x, sharding: MsignSharding | None):
    return x if sharding is None else sharding.replicated(x)


def run_replicated(f, sharding: MsignSharding | None, *args):
    """``f(*args)``, computed on whole arrays on every device when ``sharding`` is given."""
    return f(*args) if sharding is None else sharding.run_replicated(f, *args)


def run_placed(f, sharding: MsignSharding | None, *args):
    """``f(*args)`` on stacks of whole matrices (every array leading with the stack axis):
    as it comes without ``sharding``, on every device (``"gather"``) or split over the
    owners (``"owner"``, :meth:`MsignSharding.run_owned`)."""
    if sharding is None:
        return f(*args)
    return sharding.run_owned(f, *args)


def owns(sharding: MsignSharding | None) -> bool:
    """Whether ``sharding`` deals whole matrices to owners (the transformations then stack
    every same-shape group, whatever the backend)."""
    return sharding is not None and sharding.strategy == "owner"


def state_shardings(tx, params, param_shardings, *, axes=None, min_size: int = 4096):
    """Shardings for the state of optimizer ``tx`` given the parameters and their shardings.

    The state's trees with the parameters' structure (a momentum, the manifold multipliers
    and auxiliary states) are found from the structure ``tx.init`` gives, as
    ``optax.tree_map_params`` finds them; a leaf there with its parameter's shape gets that
    parameter's sharding. Any other leaf with ``min_size`` or more elements (a Stiefel
    multiplier ``m×m``, a spectral-sphere block) is split along its largest axis that the
    mesh ``axes`` (all by default) divide; small leaves (a step count) are replicated. It is
    the rule the optimizers follow themselves on meshes with Explicit axes and, given a
    strategy or a current mesh, with Auto axes; use it for ``jit``'s ``in_shardings`` /
    ``out_shardings``.

    Args:
      tx: the optimizer (an ``optax.GradientTransformation``).
      params: the parameters (arrays or ``jax.ShapeDtypeStruct``; nothing is computed).
      param_shardings: a ``NamedSharding`` per parameter leaf (a tree like ``params``).
      axes: the mesh axes that large non-parameter-shaped leaves are split over.
      min_size: the size from which such a leaf is split.

    Returns:
      A tree of ``NamedSharding`` shaped like ``tx.init(params)``.

    Example:
      >>> import jax, jax.numpy as jnp, manifold_optax as mo
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> mesh = jax.make_mesh((1,), ("fsdp",))
      >>> params = {"w": jnp.zeros((4, 4))}
      >>> sh = mo.state_shardings(mo.muon(0.02), params, {"w": NamedSharding(mesh, P("fsdp"))})
      >>> len(jax.tree.leaves(sh)) == len(jax.tree.leaves(mo.muon(0.02).init(params)))
      True
    """
    sh_flat = jax.tree.leaves(param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    if len(sh_flat) != len(jax.tree.leaves(params)):
        raise ValueError("param_shardings must have one sharding per parameter leaf")
    if not sh_flat or not all(isinstance(s, NamedSharding) for s in sh_flat):
        raise ValueError("param_shardings must be NamedShardings (one per parameter leaf)")
    mesh = sh_flat[0].mesh
    bare = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), params)
    state = jax.eval_shape(tx.init, bare)
    specs = state_specs(
        tx.init, state, bare, [s.spec for s in sh_flat], dict(mesh.shape), axes, min_size
    )
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


_DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "bf16": 2,
    "f16": 2,
    "s16": 2,
    "u16": 2,
    "f32": 4,
    "s32": 4,
    "u32": 4,
    "f64": 8,
    "s64": 8,
    "u64": 8,
    "c64": 8,
    "c128": 16,
}
_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_SHAPE = re.compile(
    r"\b(pred|s8|u8|bf16|f16|s16|u16|f32|s32|u32|f64|s64|u64|c64|c128)\[([0-9,]*)\]"
)


_GROUPS = re.compile(
    r"replica_groups=(\{\}|\{\{[0-9,{} ]*\}\}|\[[0-9,]+\]<=\[[0-9,]+\](?:T\([0-9,]+\))?)"
)


_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")


def _group_size(line: str, default: int) -> int:
    """Devices per replica group of one collective (``{}``: all of them). Forms: explicit
    ``{{0,1},{2,3}}``, iota ``[groups,size]<=[...]``, and mesh axes
    ``mesh['a'=2,'b'=4] {'b'}`` (the product of the named axes' sizes)."""
    mm = _MESH_GROUPS.search(line)
    if mm:
        sizes = dict(re.findall(r"'([^']+)'=([0-9]+)", mm.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", mm.group(2)))
    m = _GROUPS.search(line)
    if not m or m.group(1) == "{}":
        return default
    g = m.group(1)
    if g.startswith("["):  # iota form [num_groups, group_size]<=[...]
        return int(g[1 : g.index("]")].split(",")[-1])
    first = g[2 : g.index("}")]
    return len([x for x in first.split(",") if x.strip()])


# Bytes a device receives per byte of the collective's result with groups of g devices
# (bandwidth-optimal ring algorithms): an all-gather brings in the g−1 shards it lacks, a
# reduce-scatter the g−1 partial sums of its shard, an all-reduce is both.
_MOVED = {
    "all-gather": lambda g: (g - 1) / g,
    "reduce-scatter": lambda g: g - 1,
    "all-reduce": lambda g: 2 * (g - 1) / g,
    "all-to-all": lambda g: (g - 1) / g,
    "collective-permute": lambda g: 1,
}


def collective_bytes(compiled, num_devices: int | None = None) -> dict:
    """Bytes each collective kind moves into one device per step, read from compiled HLO.

    ``compiled`` is a ``jax.stages.Compiled`` (``jax.jit(f).lower(...).compile()``) or HLO
    text. For each collective instruction (async ``-start`` forms included, ``-done`` skipped)
    its result's bytes ``R`` and its replica-group size ``g`` give the bytes a device receives
    under bandwidth-optimal algorithms: all-gather ``R(g−1)/g``, reduce-scatter ``R(g−1)``,
    all-reduce ``2R(g−1)/g``, all-to-all ``R(g−1)/g``, collective-permute ``R``. Groups
    written ``{}`` span all devices: the module's ``num_partitions`` (or ``num_devices``).
    ``"total"`` sums the kinds; ``"result_bytes"`` sums ``R`` alone (an upper bound that
    ignores group sizes: e.g. a 2-D mesh gathers in two stages, ½ + 1 of the matrix).
    """
    text = compiled if isinstance(compiled, str) else compiled.as_text()
    header = re.search(r"num_partitions=([0-9]+)", text)
    n_all = num_devices or (int(header.group(1)) if header else 1)
    out = {k: 0.0 for k in _COLLECTIVES}
    result_bytes = 0
    for line in text.splitlines():
        if "=" not in line:
            continue
        lhs, rhs = line.split("=", 1)
        m = re.match(r"\s*(\([^)]*\)|[a-z0-9]+\[[0-9,]*\](\{[^}]*\})?)\s+([a-z\-]+)\(", rhs)
        if not m:
            continue
        op = m.group(3)
        kind = next((k for k in _COLLECTIVES if op == k or op == k + "-start"), None)
        if kind is None:
            continue
        shapes = _SHAPE.findall(m.group(1))
        if op.endswith("-start") and len(shapes) > 1 and kind != "all-reduce":
            shapes = shapes[-1:]  # (operand, result) tuple of an async start: count the result
        total = 0
        for dt, dims in shapes:
            size = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
            total += size * _DTYPE_BYTES[dt]
        result_bytes += total
        out[kind] += total * _MOVED[kind](_group_size(rhs, n_all))
    out["total"] = sum(out[k] for k in _COLLECTIVES)
    out["result_bytes"] = result_bytes
    return out
