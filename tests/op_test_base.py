"""One test suite per op, run over every implementation in its table (tokamax's test_base pattern).

A test class derives from `OpSuite`, names its op (`OP`, from `pallas_kernels.registry`)
and lists cases. `OpSuite.pytest_generate_tests` crosses every case with every
implementation name in the op's table, so an implementation added to the table runs
the whole suite with no new test code:

* ``test_numerics[impl-case]``: ``op(..., implementation=impl, interpret=True)`` (Pallas
  implementations run interpreted on CPU) against the op's ``reference`` implementation
  (`Case.compare`) and against the case's independent check where it has one
  (`Case.check`: numpy, or the unquantized float product). The reference itself is
  held to the independent check only. An implementation the case names in
  `Case.refuse` must raise `UnsupportedError` with that reason (it refuses the inputs
  by design) instead of running.
* ``test_bad_input[impl-case]``: the op raises the same one-line ValueError/TypeError
  whatever implementation is requested (it validates before selecting one); a Pallas
  implementation's function called directly, without the op, raises the same kind of
  error naming the same problem.
* ``test_export[platform-impl-case]``: `jax.export` lowering for ``tpu`` and ``cuda``
  through the op on an export platform (``Platform("tpu"/"gpu", "export")``):
  ``mosaic_tpu`` lowers to a Mosaic custom call, ``triton`` to a Triton one, ``xla``
  and ``reference`` to plain XLA with no kernel. A Pallas implementation for the other
  chip, or one the case names in `Export.refuse`, must raise `UnsupportedError` with
  its reason.

Inputs and reference outputs are built once per case and shared by the
implementations (`OpSuite.inputs`, `OpSuite.reference_output`). Numerics run under
`fast_jit`: one compile per call (eagerly, every primitive compiles on its own) at
XLA:CPU's lowest backend optimization level (it changes LLVM code generation only, not
the HLO; results may differ in the last bits), which compiles interpret-mode kernels
faster.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import numpy as np
import pytest
from jax import export

from pallas_kernels.op_api import Op, Platform, UnsupportedError

Inputs = tuple[tuple, dict]
# XLA:CPU compile options for tests: the lowest LLVM optimization level.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
_TRITON_CALL = "__gpu$xla.gpu.triton"
# jax.export platform -> (the op's platform, the custom call a Pallas kernel lowers to)
EXPORT_PLATFORMS = {
  "tpu": (Platform("tpu", "export"), "tpu_custom_call"),
  "cuda": (Platform("gpu", "export"), _TRITON_CALL),
}
_KERNEL_CALLS = tuple(call for _, call in EXPORT_PLATFORMS.values())
_VARIANT = r"( \(variant '\w+'\))?"  # how a refusal names the implementation's variant


def fast_jit(fn, **kwargs):
  """`jax.jit` with `FAST_COMPILE` (test numerics, not speed)."""
  return jax.jit(fn, compiler_options=FAST_COMPILE, **kwargs)


def pallas_call_names(jaxpr) -> list[str]:
  """The names of the `pallas_call`s in `jaxpr` and every jaxpr nested in it (loops,
  conds, jits): which kernels a traced model path really calls."""
  names = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      names.append(str(eqn.params["name"]).split()[0])
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          names += pallas_call_names(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          names += pallas_call_names(sub)
  return names


# ------------------------------------------------------------------ comparisons


def rel_max(tol: float) -> Callable[[Any, Any], None]:
  """``max |out - ref| <= tol * max |ref|`` (out and ref of one shape)."""

  def compare(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    err = float(np.abs(out - ref).max() / np.abs(ref).max())
    assert err <= tol, f"max |out - ref| / max |ref| = {err:.3g} > {tol:g}"

  return compare


def allclose(atol: float, rtol: float) -> Callable[[Any, Any], None]:
  """Elementwise ``|out - ref| <= atol + rtol * |ref|``."""

  def compare(out, ref):
    np.testing.assert_allclose(np.asarray(out, np.float64), np.asarray(ref), atol=atol, rtol=rtol)

  return compare


def rel_frobenius(a, b) -> float:
  """``||a - b|| / ||b||`` in float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ------------------------------------------------------------------ cases


@dataclasses.dataclass(frozen=True, eq=False)
class Case:
  """A numerics case.

  Attributes:
    id: the test id.
    make: ``make() -> (args, kwargs)`` of the op call (built once, shared).
    compare: ``compare(out, reference_out)`` raises AssertionError when an
      implementation is too far from the op's reference.
    check: ``check(out, args, kwargs)`` against an independent reference (numpy,
      the unquantized product); every implementation, the reference included.
    refuse: implementation -> regex of the reason it refuses these inputs by design.
    dtype: the output dtype every non-reference implementation returns (default:
      the reference's).
  """

  id: str
  make: Callable[[], Inputs]
  compare: Callable[[Any, Any], None]
  check: Callable[[Any, tuple, dict], None] | None = None
  refuse: Mapping[str, str] = dataclasses.field(default_factory=dict)
  dtype: Any = None


@dataclasses.dataclass(frozen=True, eq=False)
class BadInput:
  """Inputs the op must reject: ``make() -> (args, kwargs)``, the exception and a regex."""

  id: str
  make: Callable[[], Inputs]
  exc: type[Exception]
  match: str


@dataclasses.dataclass(frozen=True, eq=False)
class Export:
  """An export lowering: abstract ``args`` (ShapeDtypeStructs), static ``kwargs``.

  Attributes:
    out_shape: the expected output shape.
    refuse: ``(platform, implementation)`` -> regex of the reason it refuses by design.
  """

  id: str
  args: tuple
  kwargs: Mapping[str, Any]
  out_shape: tuple[int, ...]
  refuse: Mapping[tuple[str, str], str] = dataclasses.field(default_factory=dict)


# ------------------------------------------------------------------ the suite


class OpSuite:
  """Base of one op's test class; set `OP` and the case lists."""

  OP: ClassVar[Op]
  NUMERICS: ClassVar[tuple[Case, ...]] = ()
  BAD_INPUTS: ClassVar[tuple[BadInput, ...]] = ()
  EXPORTS: ClassVar[tuple[Export, ...]] = ()

  def pytest_generate_tests(self, metafunc):
    names = self.OP.names
    if "numerics" in metafunc.fixturenames:
      pairs = [(i, c) for c in self.NUMERICS for i in names]
      metafunc.parametrize(("impl", "numerics"), pairs, ids=[f"{i}-{c.id}" for i, c in pairs])
    if "bad" in metafunc.fixturenames:
      pairs = [(i, c) for c in self.BAD_INPUTS for i in names]
      metafunc.parametrize(("impl", "bad"), pairs, ids=[f"{i}-{c.id}" for i, c in pairs])
    if "lowering" in metafunc.fixturenames:
      triples = [(p, i, c) for c in self.EXPORTS for p in EXPORT_PLATFORMS for i in names]
      metafunc.parametrize(
        ("platform", "impl", "lowering"), triples, ids=[f"{p}-{i}-{c.id}" for p, i, c in triples]
      )

  # One build per case, shared by every implementation (and by the class's instances).
  @classmethod
  @functools.cache
  def inputs(cls, case: Case) -> Inputs:
    return case.make()

  @classmethod
  @functools.cache
  def reference_output(cls, case: Case):
    args, kwargs = cls.inputs(case)
    return jax.block_until_ready(cls.jitted("reference", args, kwargs))

  @classmethod
  def jitted(cls, impl: str, args, kwargs):
    """The op under jit: one compile per call instead of one per primitive (eager)."""
    return fast_jit(functools.partial(cls.OP, implementation=impl, interpret=True, **kwargs))(*args)

  def run(self, impl: str, args, kwargs):
    return self.OP(*args, implementation=impl, interpret=True, **kwargs)

  def test_numerics(self, impl, numerics):
    case = numerics
    args, kwargs = self.inputs(case)
    if impl in case.refuse:
      pattern = rf"op '{self.OP.name}': implementation '{impl}'{_VARIANT} cannot run on .*{case.refuse[impl]}"
      with pytest.raises(UnsupportedError, match=pattern):
        self.jitted(impl, args, kwargs)
      return
    assert case.check is not None or impl != "reference", (
      f"case {case.id}: the reference is compared with nothing; give the case a check"
    )
    ref = self.reference_output(case)
    if impl == "reference":
      out = ref  # the very call the others are compared with
    else:
      out = jax.block_until_ready(self.jitted(impl, args, kwargs))
      assert out.shape == ref.shape, (out.shape, ref.shape)
      assert out.dtype == (case.dtype or ref.dtype), (out.dtype, case.dtype or ref.dtype)
      case.compare(out, ref)
    if case.check is not None:
      case.check(out, args, kwargs)

  def test_bad_input(self, impl, bad):
    args, kwargs = bad.make()
    with pytest.raises(bad.exc, match=bad.match) as raised:
      self.run(impl, args, kwargs)
    message = str(raised.value)
    assert "\n" not in message, message
    # The op validated before choosing: the error is the validation's own, for any impl.
    with pytest.raises(bad.exc) as direct:
      self.OP.validate(*args, **kwargs)
    assert type(raised.value) is type(direct.value) and message == str(direct.value)
    implementation = self.OP.get(impl)
    if implementation.kind == "pallas":  # the kernel guards itself when called directly
      with pytest.raises(bad.exc, match=bad.match):
        implementation.fn(*args, interpret=True, **kwargs)

  def test_export(self, platform, impl, lowering):
    op_platform, kernel_call = EXPORT_PLATFORMS[platform]
    implementation = self.OP.get(impl)
    refusal = lowering.refuse.get((platform, impl))
    if implementation.kind == "pallas" and implementation.backend != op_platform.backend:
      refusal = f"its kernel compiles for {implementation.backend} only"
    kwargs = dict(lowering.kwargs)

    def f(*args):
      return self.OP(*args, implementation=impl, platform=op_platform, **kwargs)

    lower = export.export(
      jax.jit(f),
      platforms=[platform],
      disabled_checks=[export.DisabledSafetyCheck.custom_call(_TRITON_CALL)],
    )
    if refusal is not None:
      pattern = (
        rf"op '{self.OP.name}': implementation '{impl}'{_VARIANT} cannot run on export: .*{refusal}"
      )
      with pytest.raises(UnsupportedError, match=pattern):
        lower(*lowering.args)
      return
    exp = lower(*lowering.args)
    assert exp.out_avals[0].shape == tuple(lowering.out_shape)
    text = exp.mlir_module()
    if implementation.kind == "pallas":
      assert kernel_call in text, f"{impl} did not lower to {kernel_call}"
    else:
      found = [c for c in _KERNEL_CALLS if c in text]
      assert not found, f"{impl} lowered to a kernel: {found}"


def sds(shape, dtype) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(shape), dtype)


__all__ = [
  "EXPORT_PLATFORMS",
  "BadInput",
  "Case",
  "Export",
  "OpSuite",
  "allclose",
  "fast_jit",
  "rel_frobenius",
  "rel_max",
  "sds",
]
