"""The golden self-test: fixed inputs, the outputs the model gave for them, and the check.

The packager generates inputs (:func:`generate_inputs`), runs the model, and
stores both with :func:`save_cases` in the bundle (``selftest.npz``). The agent
reads them back with :func:`load_cases` and, before activating a bundle, checks
that its own runtime reproduces the outputs (:func:`run_selftest`).

The self-test file format (version 1) is an ``.npz`` archive (a zip of ``.npy``
members) readable by ``numpy.load``:

* ``meta.npy``: a uint8 array holding UTF-8 JSON
  ``{"format": 1, "cases": N, "inputs": [names], "outputs": [names]}``;
* ``in.<case>.<i>.npy`` / ``out.<case>.<i>.npy``: the array of the ``i``-th
  input / output name of case ``case``. Tensor names live in ``meta`` only,
  because they may contain ``/``, ``:`` or anything else.

Writing is deterministic (fixed member timestamps, stored, no compression), so
the same cases always give the same bytes and the same signed digest; plain
``np.savez`` stamps the current time into every member. Reading never unpickles
(object dtypes are refused) and checks every header against the archive's
declared sizes before allocating anything.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
import zipfile
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from agent.errors import ModelError, SelfTestFailed, UsageError
from agent.manifest import DTYPES, TensorSpec

if TYPE_CHECKING:
    from agent.runtime import Session

log = logging.getLogger(__name__)

__all__ = [
    "CASES_FORMAT", "SelfTestResult", "default_tolerance", "generate_inputs", "load_cases",
    "run_selftest", "save_cases",
]

CASES_FORMAT = 1
_META = "meta.npy"
_MEMBER = re.compile(r"^(in|out)\.(0|[1-9]\d{0,5})\.(0|[1-9]\d{0,5})\.npy\Z")
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_MAX_META_BYTES = 1 << 20
_ALLOWED_DTYPES = frozenset(np.dtype(d) for d in DTYPES)

Case = dict[str, np.ndarray]


# --- inputs -----------------------------------------------------------------


def generate_inputs(specs: Sequence[TensorSpec], *, cases: int, seed: int = 0) -> list[Case]:
    """``cases`` deterministic input sets for tensors ``specs``.

    Same specs, cases and seed give the same arrays on every machine (numpy's
    PCG64 ``default_rng``; values are drawn case by case, tensor by tensor).
    Dynamic dimensions (``-1``) become 1. Floats are standard normal; integers
    are uniform over their dtype's range, except quantized inputs, which are a
    standard normal quantized with the tensor's (first) scale and zero point
    and clipped, i.e. what the float model would see; bools are fair coins.
    Integer inputs that are indices (token ids, positions) need real data
    instead: a uniform int64 is out of any vocabulary.
    """
    if cases < 1:
        raise UsageError(f"cases must be at least 1, got {cases}")
    rng = np.random.default_rng(seed)
    out: list[Case] = []
    for _ in range(cases):
        case: Case = {}
        for spec in specs:
            shape = tuple(1 if d == -1 else d for d in spec.shape)
            dtype = np.dtype(spec.dtype)
            if dtype.kind == "f":
                value = rng.standard_normal(shape).astype(dtype)
            elif dtype.kind == "b":
                value = rng.random(shape) < 0.5
            else:
                info = np.iinfo(dtype)
                q = spec.quantization
                if q is not None and q.scale[0] > 0:
                    real = rng.standard_normal(shape)
                    value = np.clip(np.round(real / q.scale[0]) + q.zero_point[0], info.min, info.max).astype(dtype)
                else:
                    value = rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
            case[spec.name] = np.asarray(value, dtype=dtype)
        out.append(case)
    return out


# --- the file ---------------------------------------------------------------


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, allow_pickle=False)
    return buf.getvalue()


def _names(cases: Sequence[Mapping[str, np.ndarray]], kind: str) -> list[str]:
    names = list(cases[0])
    for i, case in enumerate(cases):
        if set(case) != set(names):
            raise UsageError(f"{kind} case {i} has tensors {sorted(case)}, case 0 has {sorted(names)}")
        for name, value in case.items():
            if not isinstance(value, np.ndarray) or value.dtype not in _ALLOWED_DTYPES:
                raise UsageError(f"{kind} case {i}, tensor {name!r}: a numeric or bool numpy array is required")
    return names


def save_cases(inputs: Sequence[Mapping[str, np.ndarray]], outputs: Sequence[Mapping[str, np.ndarray]]) -> bytes:
    """Serialize self-test cases (one input dict and one output dict per case) to ``.npz`` bytes."""
    if not inputs or len(inputs) != len(outputs):
        raise UsageError(f"self-test needs at least one case and as many outputs as inputs "
                         f"({len(inputs)} inputs, {len(outputs)} outputs)")
    in_names, out_names = _names(inputs, "input"), _names(outputs, "output")
    meta = {"format": CASES_FORMAT, "cases": len(inputs), "inputs": in_names, "outputs": out_names}
    members: list[tuple[str, bytes]] = [
        (_META, _npy(np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)))]
    for c in range(len(inputs)):
        members += [(f"in.{c}.{i}.npy", _npy(inputs[c][n])) for i, n in enumerate(in_names)]
        members += [(f"out.{c}.{i}.npy", _npy(outputs[c][n])) for i, n in enumerate(out_names)]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)
    return buf.getvalue()


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f, max_header_size=10000)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f, max_header_size=10000)
        else:
            raise ModelError(f"self-test member {info.filename}: unsupported .npy version {version}")
        if dtype.hasobject or dtype.newbyteorder("=") not in _ALLOWED_DTYPES:
            raise ModelError(f"self-test member {info.filename}: dtype {dtype} is not allowed (numeric and bool arrays only, no pickles)")
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes != info.file_size - f.tell():
            raise ModelError(f"self-test member {info.filename}: header says {nbytes} bytes of data, "
                             f"the member holds {info.file_size - f.tell()}")
        data = f.read(nbytes)
    if len(data) != nbytes:
        raise ModelError(f"self-test member {info.filename} is truncated")
    array = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    return array.astype(dtype.newbyteorder("="), order="C")  # a native-endian, C-ordered copy


def _meta_names(meta: Mapping[str, Any], key: str) -> list[str]:
    names = meta.get(key)
    if (not isinstance(names, list) or not names or len(set(names)) != len(names)
            or not all(isinstance(n, str) and n for n in names)):
        raise ModelError(f"self-test metadata: {key!r} must be a non-empty list of unique names")
    return names


def load_cases(data: bytes, *, max_bytes: int) -> tuple[list[Case], list[Case]]:
    """Parse self-test bytes written by :func:`save_cases` into (inputs, outputs), one dict per case.

    ``max_bytes`` caps both the archive and the sum of its members' sizes.
    Anything else than what :func:`save_cases` writes (pickles, unknown or
    missing members, inconsistent sizes, an unknown format version) raises
    :class:`ModelError`.
    """
    if len(data) > max_bytes:
        raise ModelError(f"self-test file is {len(data)} bytes, over the limit of {max_bytes}")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
            names = [i.filename for i in infos]
            if len(set(names)) != len(names):
                raise ModelError("self-test file has duplicate members")
            if any(i.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) or i.flag_bits & 0x1
                   for i in infos):
                raise ModelError("self-test file uses encryption or a compression other than stored/deflated")
            if sum(i.file_size for i in infos) > max_bytes:
                raise ModelError(f"self-test file unpacks to more than {max_bytes} bytes")
            bad = [n for n in names if n != _META and not _MEMBER.match(n)]
            if bad:
                raise ModelError(f"self-test file has unexpected members {bad[:5]}")
            if _META not in names:
                raise ModelError(f"self-test file has no {_META}")
            meta_info = zf.getinfo(_META)
            if meta_info.file_size > _MAX_META_BYTES:
                raise ModelError("self-test metadata is too large")
            raw = _read_member(zf, meta_info)
            if raw.dtype != np.uint8 or raw.ndim != 1:
                raise ModelError("self-test metadata must be a 1-d uint8 array")
            try:
                meta = json.loads(raw.tobytes().decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ModelError(f"self-test metadata is not JSON: {exc}") from None
            if not isinstance(meta, dict) or meta.get("format") != CASES_FORMAT:
                fmt = meta.get("format") if isinstance(meta, dict) else None
                raise ModelError(f"self-test file format {fmt!r} is not supported (this release reads {CASES_FORMAT})")
            cases = meta.get("cases")
            if not isinstance(cases, int) or isinstance(cases, bool) or cases < 1:
                raise ModelError("self-test metadata: 'cases' must be a positive integer")
            in_names, out_names = _meta_names(meta, "inputs"), _meta_names(meta, "outputs")
            expected = {_META} | {f"{kind}.{c}.{i}.npy" for c in range(cases)
                                  for kind, n in (("in", in_names), ("out", out_names)) for i in range(len(n))}
            if set(names) != expected:
                raise ModelError(f"self-test members do not match its metadata "
                                 f"({len(names)} members, {len(expected)} expected)")
            inputs = [{n: _read_member(zf, zf.getinfo(f"in.{c}.{i}.npy")) for i, n in enumerate(in_names)}
                      for c in range(cases)]
            outputs = [{n: _read_member(zf, zf.getinfo(f"out.{c}.{i}.npy")) for i, n in enumerate(out_names)}
                       for c in range(cases)]
    except ModelError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, ValueError, OSError, EOFError,
            NotImplementedError, RuntimeError) as exc:
        raise ModelError(f"self-test file is malformed: {exc}") from exc
    return inputs, outputs


# --- the check --------------------------------------------------------------


def default_tolerance(dtype: str, quantized: bool) -> tuple[float, float]:
    """``(rtol, atol)`` for comparing an output of ``dtype`` on a device with the golden one.

    An element passes when ``|actual - expected| <= atol + rtol * |expected|``.

    * Rebuilding with the same runtime version on the same CPU is bit-exact in
      practice; across CPUs (AVX2/AVX-512/NEON kernels, FMA) and runtime
      versions float32 results differ at about 1e-6 relative. float32 gets
      ``(1e-4, 1e-5)``: two orders of magnitude of headroom, still far below a
      wrong model or a runtime that computes garbage (errors of 1e-1 and up).
    * float16 has a 1e-3 epsilon, so ``(1e-2, 1e-3)``; float64 ``(1e-7, 1e-9)``.
    * A float output of a quantized model (dynamic range, QDQ with float
      output) inherits integer rounding that differs between kernels (VNNI or
      not, ARM dot-product): one step of an intermediate moves it by about a
      percent, so ``(2e-2, 2e-2)``.
    * A quantized int8/uint8/int16 output is compared in raw integer units
      and may be off by one quantization step: ``(0, 1)``.
    * Other integer and bool outputs (argmax, masks) must match exactly: ``(0, 0)``.
    """
    kind = np.dtype(dtype).kind
    if kind == "f":
        if quantized:
            return (2e-2, 2e-2)
        return {"float16": (1e-2, 1e-3), "float64": (1e-7, 1e-9)}.get(np.dtype(dtype).name, (1e-4, 1e-5))
    if quantized and kind in "iu":
        return (0.0, 1.0)
    return (0.0, 0.0)


@dataclass(frozen=True, kw_only=True)
class SelfTestResult:
    """What a passing self-test measured. ``max_rel_error`` is over elements whose expected value is not 0."""

    cases: int
    max_abs_error: float
    max_rel_error: float
    passed: bool


def _check_feed(spec: TensorSpec, value: Any, case: int) -> None:
    if not isinstance(value, np.ndarray):
        raise SelfTestFailed(f"case {case}: input {spec.name!r} is not an array")
    if value.dtype != np.dtype(spec.dtype) or not spec.matches_shape(value.shape):
        raise SelfTestFailed(f"case {case}: input {spec.name!r} is {value.dtype}{list(value.shape)}, "
                             f"the model takes {spec.dtype}{list(spec.shape)}")


def run_selftest(session: Session, inputs: Sequence[Mapping[str, np.ndarray]],
                 expected: Sequence[Mapping[str, np.ndarray]], *, rtol: float, atol: float) -> SelfTestResult:
    """Run every case on ``session`` and compare its outputs with ``expected``.

    Raises :class:`SelfTestFailed` naming the case and tensor when inputs do
    not fit the session, the model fails to run, an output contains NaN or
    Inf, or differs from the expected one beyond ``atol + rtol * |expected|``.
    """
    if not inputs or len(inputs) != len(expected):
        raise SelfTestFailed(f"self-test has {len(inputs)} input case(s) and {len(expected)} expected")
    in_names = {s.name for s in session.inputs}
    out_names = [s.name for s in session.outputs]
    max_abs = max_rel = 0.0
    for c, (feeds, want) in enumerate(zip(inputs, expected)):
        if set(feeds) != in_names:
            raise SelfTestFailed(f"case {c}: inputs {sorted(feeds)} do not match the model's {sorted(in_names)}")
        if set(want) != set(out_names):
            raise SelfTestFailed(f"case {c}: expected outputs {sorted(want)} do not match the model's "
                                 f"{sorted(out_names)}")
        for spec in session.inputs:
            _check_feed(spec, feeds[spec.name], c)
        try:
            got = session.run(feeds)
        except ModelError as exc:
            raise SelfTestFailed(f"case {c}: {exc}") from exc
        for name in out_names:
            a, e = np.asarray(got[name]), np.asarray(want[name])
            if a.shape != e.shape:
                raise SelfTestFailed(f"output {name!r} of case {c} has shape {list(a.shape)}, "
                                     f"expected {list(e.shape)}")
            a64, e64 = a.astype(np.float64), e.astype(np.float64)
            for arr, what in ((a64, "output"), (e64, "expected output")):
                if not np.all(np.isfinite(arr)):
                    bad = "NaN" if np.isnan(arr).any() else "Inf"
                    raise SelfTestFailed(f"{what} {name!r} of case {c} contains {bad}")
            if a.size == 0:
                continue
            diff = np.abs(a64 - e64)
            bound = atol + rtol * np.abs(e64)
            nonzero = e64 != 0
            rel = float(np.max(diff[nonzero] / np.abs(e64[nonzero]))) if nonzero.any() else 0.0
            max_abs, max_rel = max(max_abs, float(diff.max())), max(max_rel, rel)
            over = diff > bound
            if over.any():
                at = np.unravel_index(int(np.argmax(np.where(over, diff - bound, -np.inf))), diff.shape)
                raise SelfTestFailed(
                    f"output {name!r} of case {c} differs from the golden output: at {tuple(int(i) for i in at)} "
                    f"got {a64[at]:.7g}, expected {e64[at]:.7g} (|error| {diff[at]:.3g} > tolerance "
                    f"{bound[at]:.3g} = atol {atol:g} + rtol {rtol:g} * |expected|; "
                    f"{int(over.sum())} of {over.size} elements out of tolerance)")
    log.debug("self-test passed: %d case(s), max abs error %.3g, max rel error %.3g",
              len(inputs), max_abs, max_rel)
    return SelfTestResult(cases=len(inputs), max_abs_error=max_abs, max_rel_error=max_rel, passed=True)
