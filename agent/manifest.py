"""The bundle manifest (``manifest.json``): what a bundle holds and how to check it.

Pure data: parsing validates every field and raises :class:`ManifestError`
naming the field; nothing here touches files.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Mapping, Sequence, cast, get_args

from agent.errors import ManifestError, UnknownFormat

FORMAT_VERSION = 1
"""Version of the bundle format this release writes. Readers accept KNOWN_FORMATS."""
KNOWN_FORMATS = (1,)
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "model.sig"
SELFTEST_NAME = "selftest.npz"

Runtime = Literal["onnx", "tflite"]
RUNTIMES: tuple[str, ...] = get_args(Runtime)
DType = Literal[
    "float32", "float16", "float64", "int8", "uint8", "int16", "uint16",
    "int32", "uint32", "int64", "uint64", "bool",
]
DTYPES: tuple[str, ...] = get_args(DType)

_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?\Z"
)
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}\Z")
_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
_ARCH = re.compile(r"^[a-z0-9_]{1,32}\Z")
_VERSION_NUM = re.compile(r"^\d+(\.\d+){0,3}\Z")


def check_name(name: str) -> str:
    """A model name: lower-case letters, digits, ``.``, ``_``, ``-``; at most 64 chars."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ManifestError(
            f"invalid model name {name!r}: use 1-64 of a-z 0-9 . _ - , starting with a letter or digit"
        )
    return name


def check_semver(version: str) -> str:
    if not isinstance(version, str) or not _SEMVER.match(version):
        raise ManifestError(f"invalid version {version!r}: expected semantic version like 1.2.3")
    return version


def semver_key(version: str) -> tuple[Any, ...]:
    """Sort key implementing semver precedence (build metadata ignored)."""
    m = _SEMVER.match(version)
    if not m:
        raise ManifestError(f"invalid version {version!r}")
    major, minor, patch, pre = int(m[1]), int(m[2]), int(m[3]), m[4]
    if pre is None:
        return (major, minor, patch, 1, ())
    parts = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split("."))
    return (major, minor, patch, 0, parts)


def version_tuple(version: str) -> tuple[int, ...]:
    """``"2.17.0"`` -> ``(2, 17, 0)``; pre-release/local suffixes are dropped."""
    m = re.match(r"^(\d+(?:\.\d+)*)", version.strip())
    if not m:
        raise ManifestError(f"invalid runtime version {version!r}")
    return tuple(int(p) for p in m[1].split("."))


def _req(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in data:
        raise ManifestError(f"{where}: missing field {key!r}")
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ManifestError(f"{where}.{key}: wrong type {type(value).__name__}")
    return value


def _opt(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if data.get(key) is None:
        return None
    return _req(data, key, kind, where)


def _only(data: Mapping[str, Any], allowed: set[str], where: str) -> None:
    extra = set(data) - allowed
    if extra:
        raise ManifestError(f"{where}: unknown field(s) {sorted(extra)}")


@dataclass(frozen=True, kw_only=True)
class QuantParams:
    """Affine quantization of a tensor: ``real = scale * (q - zero_point)``."""

    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    axis: int | None = None

    def __post_init__(self) -> None:
        if len(self.scale) != len(self.zero_point) or not self.scale:
            raise ManifestError("quantization: scale and zero_point must be non-empty and of equal length")

    @classmethod
    def from_dict(cls, d: Any, where: str) -> QuantParams:
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: must be an object")
        _only(d, {"scale", "zero_point", "axis"}, where)
        scale = _req(d, "scale", list, where)
        zp = _req(d, "zero_point", list, where)
        if not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scale):
            raise ManifestError(f"{where}.scale: numbers expected")
        if not all(isinstance(z, int) and not isinstance(z, bool) for z in zp):
            raise ManifestError(f"{where}.zero_point: integers expected")
        return cls(scale=tuple(float(s) for s in scale), zero_point=tuple(zp), axis=_opt(d, "axis", int, where))


@dataclass(frozen=True, kw_only=True)
class TensorSpec:
    """One model input or output. ``-1`` in ``shape`` is a dynamic dimension."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    quantization: QuantParams | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or len(self.name) > 256:
            raise ManifestError(f"tensor name {self.name!r} is invalid")
        if self.dtype not in DTYPES:
            raise ManifestError(f"tensor {self.name!r}: unsupported dtype {self.dtype!r}")
        if len(self.shape) > 8 or any(d < -1 for d in self.shape):
            raise ManifestError(f"tensor {self.name!r}: invalid shape {self.shape}")

    def matches_shape(self, shape: Sequence[int]) -> bool:
        return len(shape) == len(self.shape) and all(s == -1 or s == a for s, a in zip(self.shape, shape))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.quantization is not None:
            q = asdict(self.quantization)
            q["scale"] = list(q["scale"])
            q["zero_point"] = list(q["zero_point"])
            d["quantization"] = q
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str) -> TensorSpec:
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: must be an object")
        _only(d, {"name", "dtype", "shape", "quantization"}, where)
        shape = _req(d, "shape", list, where)
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= -1 for x in shape):
            raise ManifestError(f"{where}.shape: integers >= -1 expected")
        q = d.get("quantization")
        return cls(
            name=_req(d, "name", str, where),
            dtype=cast(DType, _req(d, "dtype", str, where)),
            shape=tuple(shape),
            quantization=None if q is None else QuantParams.from_dict(q, f"{where}.quantization"),
        )


@dataclass(frozen=True, kw_only=True)
class RuntimeReq:
    """The runtime a bundle runs on and the oldest release of it known to run it correctly."""

    name: Runtime
    min_version: str

    def __post_init__(self) -> None:
        if self.name not in RUNTIMES:
            raise ManifestError(f"runtime: unsupported runtime {self.name!r} (expected one of {RUNTIMES})")
        if not isinstance(self.min_version, str) or not _VERSION_NUM.match(self.min_version):
            raise ManifestError(f"runtime.min_version: invalid version {self.min_version!r}")


@dataclass(frozen=True, kw_only=True)
class DeviceClass:
    """Where a bundle may run: CPU architecture (``any`` for portable models) and an optional accelerator."""

    arch: str = "any"
    accelerator: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.arch, str) or not _ARCH.match(self.arch):
            raise ManifestError(f"device_class.arch: invalid architecture {self.arch!r}")
        if self.accelerator is not None and not _ARCH.match(self.accelerator):
            raise ManifestError(f"device_class.accelerator: invalid name {self.accelerator!r}")

    def __str__(self) -> str:
        return self.arch if self.accelerator is None else f"{self.arch}+{self.accelerator}"


@dataclass(frozen=True, kw_only=True)
class SelfTestSpec:
    """The golden self-test: ``cases`` input sets in ``file`` and the outputs the model gave for them.

    An output passes when ``|actual - expected| <= atol + rtol * |expected|`` element-wise.
    """

    file: str
    cases: int
    rtol: float
    atol: float

    def __post_init__(self) -> None:
        if not _FILE.match(self.file):
            raise ManifestError(f"selftest.file: invalid file name {self.file!r}")
        if not (1 <= self.cases <= 64):
            raise ManifestError("selftest.cases: must be 1..64")
        if not (0 <= self.rtol <= 1 and 0 <= self.atol <= 1e6):
            raise ManifestError("selftest: tolerance out of range")


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """What ``manifest.json`` says. Every field is covered by the bundle signature."""

    format: int
    name: str
    version: str
    created: str
    runtime: RuntimeReq
    device_class: DeviceClass
    model_files: tuple[str, ...]
    """The model file first, then any external-data files it references."""
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    selftest: SelfTestSpec
    labels: str | None = None
    quantization: Mapping[str, Any] | None = None
    """The quantization/evaluation report of the build (free-form, signed)."""
    builder: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.format not in KNOWN_FORMATS:
            raise UnknownFormat(f"unknown bundle format version {self.format!r} (this release reads {KNOWN_FORMATS})")
        check_name(self.name)
        check_semver(self.version)
        if not self.model_files:
            raise ManifestError("model_files: at least one model file is required")
        for f in (*self.model_files, *( [self.labels] if self.labels else [])):
            if not _FILE.match(f) or f in (MANIFEST_NAME, SIGNATURE_NAME):
                raise ManifestError(f"invalid payload file name {f!r}")
        suffix = ".onnx" if self.runtime.name == "onnx" else ".tflite"
        if not self.model_files[0].endswith(suffix):
            raise ManifestError(f"model_files[0] {self.model_files[0]!r} does not match runtime {self.runtime.name!r}")
        if not self.inputs or not self.outputs:
            raise ManifestError("a model needs at least one input and one output")
        names = [t.name for t in self.inputs] + [t.name for t in self.outputs]
        if len(set(names)) != len(names):
            raise ManifestError("tensor names must be unique")
        files = self.payload_files()
        if len(set(files)) != len(files):
            raise ManifestError("payload file names must be unique")

    @property
    def model_file(self) -> str:
        return self.model_files[0]

    def payload_files(self) -> tuple[str, ...]:
        """Every file the bundle must hold besides the signature, manifest first."""
        extra = (self.labels,) if self.labels else ()
        return (MANIFEST_NAME, *self.model_files, *extra, self.selftest.file)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "name": self.name,
            "version": self.version,
            "created": self.created,
            "runtime": {"name": self.runtime.name, "min_version": self.runtime.min_version},
            "device_class": {"arch": self.device_class.arch, "accelerator": self.device_class.accelerator},
            "model_files": list(self.model_files),
            "labels": self.labels,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "selftest": asdict(self.selftest),
            "quantization": dict(self.quantization) if self.quantization is not None else None,
            "builder": dict(self.builder),
        }

    @classmethod
    def from_dict(cls, d: Any) -> Manifest:
        w = "manifest"
        if not isinstance(d, dict):
            raise ManifestError("manifest: must be a JSON object")
        fmt = d.get("format")
        if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt not in KNOWN_FORMATS:
            raise UnknownFormat(f"unknown bundle format version {fmt!r} (this release reads {KNOWN_FORMATS})")
        _only(d, {"format", "name", "version", "created", "runtime", "device_class", "model_files", "labels",
                  "inputs", "outputs", "selftest", "quantization", "builder"}, w)
        rt = _req(d, "runtime", dict, w)
        _only(rt, {"name", "min_version"}, "runtime")
        dc = _req(d, "device_class", dict, w)
        _only(dc, {"arch", "accelerator"}, "device_class")
        st = _req(d, "selftest", dict, w)
        _only(st, {"file", "cases", "rtol", "atol"}, "selftest")
        files = _req(d, "model_files", list, w)
        if not all(isinstance(f, str) for f in files):
            raise ManifestError("model_files: strings expected")
        return cls(
            format=fmt,
            name=_req(d, "name", str, w),
            version=_req(d, "version", str, w),
            created=_req(d, "created", str, w),
            runtime=RuntimeReq(name=_req(rt, "name", str, "runtime"), min_version=_req(rt, "min_version", str, "runtime")),
            device_class=DeviceClass(arch=_req(dc, "arch", str, "device_class"),
                                     accelerator=_opt(dc, "accelerator", str, "device_class")),
            model_files=tuple(files),
            labels=_opt(d, "labels", str, w),
            inputs=tuple(TensorSpec.from_dict(t, f"inputs[{i}]") for i, t in enumerate(_req(d, "inputs", list, w))),
            outputs=tuple(TensorSpec.from_dict(t, f"outputs[{i}]") for i, t in enumerate(_req(d, "outputs", list, w))),
            selftest=SelfTestSpec(file=_req(st, "file", str, "selftest"), cases=_req(st, "cases", int, "selftest"),
                                  rtol=float(_req(st, "rtol", (int, float), "selftest")),
                                  atol=float(_req(st, "atol", (int, float), "selftest"))),
            quantization=_opt(d, "quantization", dict, w),
            builder=_opt(d, "builder", dict, w) or {},
        )
