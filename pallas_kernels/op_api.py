"""Implementation tables: every op lists its implementations and what each supports.

An `Op` is data: a name and a tuple of `Implementation`s. Each implementation
has a `kind` (``reference``: the plainest jnp; ``xla``: fused jnp; ``pallas``:
a kernel), the backend it compiles for, and a `supports` function that returns
``None`` or the reason it cannot run the given inputs on the given platform.

`Op.select` is the one place an implementation is chosen:

* ``implementation=None``: the first implementation in the backend's order
  (`PREFERENCE`) that supports the inputs; on CPU that is ``xla``.
* ``implementation="pallas"``: this backend's Pallas implementation (on CPU
  with ``interpret=True``, the op's first one); it must support the inputs.
* any other name: that implementation; it must support the inputs.

An explicit choice that cannot run raises `UnsupportedError` naming the op, the
implementation, the chip and the reason. Nothing falls back silently.

An op's `Sharding` (plain data: logical axis names of its arguments and output, the
summed and tied names) says how a call splits over a device mesh; `jaxllm.ops.call`
reads it to run every implementation per shard inside `jax.shard_map`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

KINDS = ("reference", "xla", "pallas")
PALLAS = "pallas"  # the request "this backend's Pallas implementation"
# Which kinds (in order) `implementation=None` tries on each backend.
PREFERENCE = {
  "cpu": ("xla", "reference"),
  "tpu": ("pallas", "xla", "reference"),
  "gpu": ("pallas", "xla", "reference"),
}
_GPU_BACKENDS = ("gpu", "cuda", "rocm")


class OpError(ValueError):
  """An unknown op or implementation, or a request an op cannot serve."""


class UnsupportedError(OpError):
  """The chosen implementation cannot run these inputs on this chip."""


@dataclasses.dataclass(frozen=True)
class Platform:
  """Where a call runs: the backend ("cpu", "tpu", "gpu"), the chip and interpret mode.

  `device_kind` is jax's `Device.device_kind` ("TPU v5 lite", "NVIDIA H100 80GB
  HBM3", "cpu"), or a compile-only topology's for export checks.
  `compute_capability` is a CUDA device's ("9.0"); `pallas_kernels.chips.chip_of`
  reads both to find the chip's capabilities.
  """

  backend: str
  device_kind: str = ""
  interpret: bool = False
  compute_capability: str = ""

  def __post_init__(self):
    if self.backend not in PREFERENCE:
      raise OpError(f"platform backend {self.backend!r}; expected one of {sorted(PREFERENCE)}")

  @classmethod
  def current(cls, interpret: bool = False) -> Platform:
    """The default device's platform."""
    backend = jax.default_backend()
    backend = "gpu" if backend in _GPU_BACKENDS else backend
    device = jax.devices()[0]
    cc = str(getattr(device, "compute_capability", "") or "")
    return cls(backend, device.device_kind, interpret, cc)

  @property
  def chip(self) -> str:
    return self.device_kind or self.backend


def _always(*args, **kwargs):
  del args, kwargs
  return None


@dataclasses.dataclass(frozen=True)
class Implementation:
  """One way to compute an op.

  Attributes:
    name: unique within the op ("reference", "xla", "mosaic_tpu", "triton", ...).
    kind: one of KINDS.
    fn: ``fn(*args, **kwargs)``; a Pallas one also takes ``interpret=`` and
      ``platform=`` (the `Platform` it is traced for, to read the chip from).
    backend: for ``pallas``, the backend its kernel compiles for ("tpu" or
      "gpu"); it runs elsewhere only in interpret mode.
    supports: ``supports(platform, *args, **kwargs) -> str | None``, the reason
      it cannot run these inputs (shapes and dtypes are read, never values).
    variants: names of the kernel's per-chip forms (an int8 dot, a dot of
      dequantized bf16 values, ...); empty when it has one form. An implementation
      with variants gets ``variant=`` in its kwargs, for `fn` and `supports` alike.
    pick_variant: ``pick_variant(platform) -> name``, the variant a call gets when
      it asks for none, read from the chip at trace time (default: the first).
  """

  name: str
  kind: str
  fn: Callable
  backend: str | None = None
  supports: Callable = _always
  variants: tuple[str, ...] = ()
  pick_variant: Callable | None = None

  def __post_init__(self):
    if self.kind not in KINDS:
      raise OpError(f"implementation {self.name!r}: kind {self.kind!r} not in {KINDS}")
    if (self.kind == "pallas") != (self.backend is not None):
      raise OpError(f"implementation {self.name!r}: a backend is given exactly for Pallas kinds")

  def variant_for(self, platform: Platform, requested: str | None) -> str | None:
    """The variant a call runs: `requested`, else the chip's default; None without variants."""
    if not self.variants:
      if requested is not None:
        raise OpError(f"implementation {self.name!r} has no variants; got variant={requested!r}")
      return None
    if requested is None:
      return self.pick_variant(platform) if self.pick_variant else self.variants[0]
    if requested not in self.variants:
      raise OpError(
        f"implementation {self.name!r} has no variant {requested!r}; it has {list(self.variants)}"
      )
    return requested

  def with_variant(self, platform: Platform, requested: str | None, kwargs: dict) -> dict:
    """`kwargs` plus ``variant=`` where this implementation has variants."""
    variant = self.variant_for(platform, requested)
    return kwargs if variant is None else dict(kwargs, variant=variant)

  def why_not(self, platform: Platform, *args, variant: str | None = None, **kwargs) -> str | None:
    """None when this implementation can run the inputs on `platform`, else the reason."""
    if self.kind == "pallas" and self.backend != platform.backend and not platform.interpret:
      return (
        f"its kernel compiles for {self.backend} only "
        f"(on {platform.backend}, run it with interpret=True)"
      )
    return self.supports(platform, *args, **self.with_variant(platform, variant, kwargs))


@dataclasses.dataclass(frozen=True)
class Op:
  """An op's name and its implementation table."""

  name: str
  implementations: tuple[Implementation, ...]
  validate: Callable = _always  # validate(*args, **kwargs): raises ValueError/TypeError
  sharding: Sharding | None = None  # how calls split over a mesh (None: never split)

  def __post_init__(self):
    names = [impl.name for impl in self.implementations]
    if len(set(names)) != len(names) or PALLAS in names:
      raise OpError(f"op {self.name!r}: implementation names {names} must be unique, not 'pallas'")

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(impl.name for impl in self.implementations)

  @property
  def has_pallas(self) -> bool:
    return any(impl.kind == "pallas" for impl in self.implementations)

  def get(self, name: str) -> Implementation:
    for impl in self.implementations:
      if impl.name == name:
        return impl
    raise OpError(f"op {self.name!r} has no implementation {name!r}; it has {list(self.names)}")

  def request_for(self, setting: str | None) -> str | None:
    """The request a model-wide setting makes of this op: "pallas" means this op's
    Pallas implementation where it has one, and the default (None) where it has none."""
    if setting == PALLAS and not self.has_pallas:
      return None
    return setting

  def check_request(self, implementation: str | None) -> None:
    """Raises OpError for a request this op can never serve (unknown name, no Pallas)."""
    if implementation is None:
      return
    if implementation == PALLAS:
      if not self.has_pallas:
        raise OpError(f"op {self.name!r} has no Pallas implementation; it has {list(self.names)}")
      return
    self.get(implementation)

  def _pallas_for(self, platform: Platform) -> Implementation:
    pallas = [impl for impl in self.implementations if impl.kind == "pallas"]
    native = [impl for impl in pallas if impl.backend == platform.backend]
    if native:
      return native[0]
    if platform.interpret and pallas:
      return pallas[0]
    raise UnsupportedError(
      f"op {self.name!r}: no Pallas implementation for {platform.chip} "
      f"({platform.backend}); it has {[f'{i.name} ({i.backend})' for i in pallas]}"
    )

  def select(
    self,
    implementation: str | None,
    platform: Platform,
    *args,
    variant: str | None = None,
    **kwargs,
  ) -> Implementation:
    """The implementation to run; raises UnsupportedError rather than substitute another.

    `variant` names one of the chosen implementation's per-chip forms (only with an
    explicit implementation); None lets the implementation pick by chip.
    """
    self.check_request(implementation)
    if variant is not None and implementation is None:
      raise OpError(f"op {self.name!r}: variant={variant!r} needs an explicit implementation")
    self.validate(*args, **kwargs)
    if implementation is None:
      reasons = []
      for kind in PREFERENCE[platform.backend]:
        for impl in self.implementations:
          if impl.kind != kind or (kind == "pallas" and impl.backend != platform.backend):
            continue
          reason = impl.why_not(platform, *args, **kwargs)
          if reason is None:
            return impl
          reasons.append(f"{impl.name}: {reason}")
      raise UnsupportedError(
        f"op {self.name!r}: no implementation supports these inputs on {platform.chip}: "
        + "; ".join(reasons)
      )
    impl = self._pallas_for(platform) if implementation == PALLAS else self.get(implementation)
    reason = impl.why_not(platform, *args, variant=variant, **kwargs)
    if reason is not None:
      chosen = impl.variant_for(platform, variant)
      form = f"{impl.name!r}" + (f" (variant {chosen!r})" if chosen else "")
      raise UnsupportedError(
        f"op {self.name!r}: implementation {form} cannot run on {platform.chip}: {reason}"
      )
    return impl

  def __call__(
    self,
    *args,
    implementation: str | None = None,
    interpret: bool = False,
    platform: Platform | None = None,
    variant: str | None = None,
    **kwargs,
  ):
    """Runs the selected implementation under the name scope ``op/implementation[/variant]``."""
    platform = platform or Platform.current(interpret)
    if platform.interpret != interpret:
      platform = dataclasses.replace(platform, interpret=interpret)
    impl = self.select(implementation, platform, *args, variant=variant, **kwargs)
    kwargs = impl.with_variant(platform, variant, kwargs)
    if impl.kind == "pallas":
      kwargs = dict(kwargs, interpret=interpret, platform=platform)
    scope = "/".join(filter(None, (self.name, impl.name, kwargs.get("variant"))))
    with jax.named_scope(scope):
      return impl.fn(*args, **kwargs)


@dataclasses.dataclass(frozen=True)
class Halves:
  """A dimension stored as two halves (int4 "global halves" packing: packed row j holds
  rows j and j + n/2). It is split as a ``[2, n/2]`` view with the ``n/2`` axis sharded,
  so shard i holds row blocks i of both halves: the rows that shard i of the packed
  ``[n/2, ...]`` array holds. `name` is the dimension's logical name."""

  name: str | None


def _is_dim_name(n) -> bool:
  return n is None or isinstance(n, (str, Halves))


def is_names(spec) -> bool:
  """Whether `spec` is one array's names (a tuple of names, `Halves` or None)."""
  return (
    isinstance(spec, tuple)
    and not hasattr(spec, "_fields")  # a NamedTuple is a pytree of specs
    and all(_is_dim_name(n) for n in spec)
  )


@dataclasses.dataclass(frozen=True)
class Sharding:
  """How an op's calls split over a device mesh: plain data, read by `jaxllm.ops.call`.

  Names are logical axis names (`sharding.rules`), or placeholders the caller binds
  to logical names per call (the matmul ops: ``rows``, ``in``, ``out``, bound from
  the weight's names by `jaxllm.ops.linear`). A dimension is named only where the op
  can be computed per shard: along it the op is independent (rows, batch, heads,
  output columns) or it sums over it (`summed`). Softmax and per-head dimensions
  (key slots, head_dim) are left None: they are never split inside the op.

  Attributes:
    args: per positional argument: a tuple with one name per dimension (None: never
      split; `Halves`: a dimension packed as two halves), a pytree of such tuples for
      a pytree argument (`QuantizedKV`), or None for an argument never split. A 0-d
      array and a size-1 dimension (a broadcast) are never split. Keyword arguments
      are static (not arrays).
    out: the output's names.
    summed: names of contracted dimensions; a call split along one returns partial
      sums, added (`psum`) over its mesh axes.
    tied: groups of names split identically (query heads with KV heads, so each shard
      keeps whole GQA groups): when one of them cannot be split, none is.
    row_absmax: the op quantizes argument 0 per row from its absolute maximum over
      the `summed` dimension. When that dimension is split, every implementation
      gets ``x_absmax=`` (f32 [M, 1], the whole row's maximum) so that the shards
      quantize exactly as the unsplit call does.
  """

  args: tuple
  out: tuple[str | Halves | None, ...]
  summed: tuple[str, ...] = ()
  tied: tuple[tuple[str, ...], ...] = ()
  row_absmax: bool = False


# The matmul ops' names: float rows x [M, K] times a weight [K, N] -> [M, N]. `linear`
# binds "rows" to the batch's name, "in"/"out" to the weight's K and N names.
MATMUL_ROWS, MATMUL_IN, MATMUL_OUT = "rows", "in", "out"


def without_platform(fn: Callable) -> Callable:
  """`fn` as a Pallas implementation's function when its kernel has one form on every
  chip: the ``platform=`` the op passes is dropped."""

  def run(*args, platform=None, **kwargs):
    del platform
    return fn(*args, **kwargs)

  return run


def reason_from(check: Callable, *args, **kwargs) -> str | None:
  """Runs a validation function that raises ValueError/TypeError; returns its message or None."""
  try:
    check(*args, **kwargs)
  except (ValueError, TypeError) as e:
    return str(e)
  return None


def _is_array(a) -> bool:
  """An array, tracer or ShapeDtypeStruct; not a dtype or a scalar type (which have a shape)."""
  return hasattr(a, "shape") and hasattr(a, "dtype") and not isinstance(a, (type, jnp.dtype))


def _abstract(tree):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype) if _is_array(a) else a, tree)


def supported_by_tracing(fn: Callable, **fixed) -> Callable:
  """A `supports` that traces ``fn(*args, **kwargs, **fixed)`` abstractly (`jax.eval_shape`).

  For kernels whose wrappers check tiling and dtype rules with a ValueError before
  lowering: the reason is that message. Nothing is added to the caller's program.
  """

  def supports(platform, *args, **kwargs):
    del platform
    array_args = _abstract((args, kwargs))
    static = {k: v for k, v in kwargs.items() if not _is_array(v)}

    def run(a, k):
      return fn(*a, **{**k, **static}, **fixed)

    try:
      dynamic = {k: v for k, v in array_args[1].items() if k not in static}
      jax.eval_shape(run, array_args[0], dynamic)
    except (ValueError, TypeError) as e:
      return str(e)
    return None

  return supports
