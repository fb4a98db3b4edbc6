"""Calibration data: where it comes from, how it is checked against the model, how it streams.

A calibration source yields *feeds* — dicts from model input name to a batch of samples — and
is re-iterable (passes may make several sweeps). Sources (the ``--calib`` option):

``file.npz``       one array per model input, first axis = samples;
``folder/``        every ``*.npz`` in the folder, in name order, each as above;
``random:N``       N seeded random samples (a warning: random data calibrates poorly);
``module:function`` (or ``path/to/file.py:function``) a function returning an iterable of feeds.

Arrays whose rank equals the input's rank are split into batches along the first (batch) axis
(of the model's own size when the model fixes its batch dimension, e.g. to 1);
arrays with one extra leading axis hold one complete feed per entry. ``.npz`` members are read
from the archive in chunks of ``batch_size`` samples, so memory stays bounded by the batch, not
by the number of samples.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import itertools
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx_ir as ir

from lowbit.core.errors import UserError

Feed = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple  # ints for static dims, strings / None for symbolic ones
    vocab: int | None = None  # rows of the table an integer input indexes (Gather), if any

    def describe(self) -> str:
        return "[" + ", ".join(str(d) if isinstance(d, int) else (d or "?") for d in self.shape) + "]"


def input_specs(model: ir.Model) -> list[InputSpec]:
    """The model's real inputs (not initializers), with shapes and, for indices, their range."""
    specs = []
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
            continue
        if value.type is None or not isinstance(value.type, ir.TensorType):
            raise UserError(f"model input '{value.name}' is not a tensor; lowbit handles tensor inputs only")
        shape = tuple(
            d if isinstance(d, int) else (d.value if isinstance(d, ir.SymbolicDim) else None)
            for d in (value.shape.dims if value.shape is not None else ())
        )
        vocab = None
        for user, _ in value.uses():
            if user.op_type == "Gather" and user.inputs[1] is value and user.inputs[0] is not None:
                table = user.inputs[0]
                if table.shape is not None and isinstance(table.shape[0], int):
                    vocab = table.shape[0]
        specs.append(InputSpec(value.name, value.dtype.numpy(), shape, vocab))
    return specs


def random_feed(specs: list[InputSpec], batch: int, rng: np.random.Generator, *, seq: int = 16) -> Feed:
    """A random feed: standard normal floats, in-range indices, all-ones masks.

    Symbolic dimensions become ``batch`` for the first axis and ``seq`` elsewhere.
    """
    feed = {}
    for spec in specs:
        shape = tuple(
            d if isinstance(d, int) else (batch if i == 0 else seq) for i, d in enumerate(spec.shape)
        )
        if np.issubdtype(spec.dtype, np.floating):
            feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype == np.bool_ or "mask" in spec.name.lower():
            feed[spec.name] = np.ones(shape, dtype=spec.dtype)
        elif np.issubdtype(spec.dtype, np.integer):
            high = spec.vocab if spec.vocab else 2
            feed[spec.name] = rng.integers(0, high, size=shape).astype(spec.dtype)
        else:
            raise UserError(f"cannot make random data for model input '{spec.name}' of type {spec.dtype}")
    return feed


class Calibration:
    """A re-iterable, validated stream of feeds for one model."""

    def __init__(self, label: str, make: Callable[[], Iterator[Feed]], specs: list[InputSpec], *,
                 random: bool = False, num_samples: int | None = None):
        self.label = label
        self._make = make
        self.specs = specs
        self.random = random
        self.num_samples = num_samples

    def __iter__(self) -> Iterator[Feed]:
        for index, feed in enumerate(self._make()):
            yield check_feed(feed, self.specs, f"{self.label} (batch {index})")

    def first(self, max_samples: int) -> Feed:
        """The first samples (at most ``max_samples``) as one feed, for verification."""
        parts: list[Feed] = []
        count = 0
        for feed in self:
            parts.append(feed)
            count += _batch_len(feed)
            if count >= max_samples:
                break
        if not parts:
            raise UserError(f"{self.label}: the calibration data holds no samples")
        joined = {k: np.concatenate([p[k] for p in parts])[:max_samples] for k in parts[0]}
        return joined


def _batch_len(feed: Feed) -> int:
    return min((v.shape[0] for v in feed.values() if v.ndim), default=1)


def check_feed(feed, specs: list[InputSpec], where: str) -> Feed:
    if not isinstance(feed, dict):
        raise UserError(f"{where}: a calibration feed must be a dict of input name to array, not {type(feed).__name__}")
    out = {}
    for spec in specs:
        if spec.name not in feed:
            raise UserError(f"{where}: no data for model input '{spec.name}'")
        array = np.asarray(feed[spec.name])
        _check_shape(array.shape, spec, where)
        out[spec.name] = _cast(array, spec, where)
        _check_finite(out[spec.name], spec, where)
    extra = set(feed) - {s.name for s in specs}
    if extra:
        raise UserError(f"{where}: '{sorted(extra)[0]}' is not an input of the model (inputs: {', '.join(s.name for s in specs)})")
    return out


def _check_finite(array: np.ndarray, spec: InputSpec, where: str) -> None:
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        raise UserError(f"{where}: array for input '{spec.name}' holds {bad} NaN or Inf value{'s' if bad > 1 else ''}; "
                        "calibration data must be finite")


def _check_shape(shape: tuple, spec: InputSpec, where: str, *, skip_first: bool = False) -> None:
    dims = spec.shape
    ok = len(shape) == len(dims) and all(
        not isinstance(d, int) or d == s or (i == 0 and skip_first) for i, (d, s) in enumerate(zip(dims, shape))
    )
    if not ok:
        raise UserError(f"{where}: array for input '{spec.name}' has shape {tuple(shape)}, but the model expects {spec.describe()}")


def _cast(array: np.ndarray, spec: InputSpec, where: str) -> np.ndarray:
    if array.dtype == spec.dtype:
        return array
    same_kind = (np.issubdtype(array.dtype, np.floating) and np.issubdtype(spec.dtype, np.floating)) or (
        np.issubdtype(array.dtype, np.integer) and np.issubdtype(spec.dtype, np.integer)
    )
    if not same_kind:
        raise UserError(f"{where}: array for input '{spec.name}' is {array.dtype}, but the model expects {spec.dtype}")
    return array.astype(spec.dtype)


class _NpyMember:
    """Streams one ``.npy`` member of an ``.npz`` archive in chunks along the first axis."""

    def __init__(self, archive: Path, member: str):
        self.archive, self.member = archive, member
        with zipfile.ZipFile(archive) as zf, zf.open(member) as f:
            self.shape, self.fortran, self.dtype = self._header(f)

    @staticmethod
    def _header(f):
        version = np.lib.format.read_magic(f)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = reader(f)
        if dtype.hasobject:
            raise ValueError("object arrays are not calibration data")
        return shape, fortran, dtype

    def chunks(self, size: int) -> Iterator[np.ndarray]:
        with zipfile.ZipFile(self.archive) as zf, zf.open(self.member) as f:
            if self.fortran:  # column-major data cannot be cut into row chunks; read it whole
                data = np.lib.format.read_array(f, allow_pickle=False)
                for start in range(0, len(data), size):
                    yield data[start:start + size]
                return
            self._header(f)
            row = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
            for start in range(0, self.shape[0], size):
                count = min(size, self.shape[0] - start)
                buf = f.read(row * count)
                yield np.frombuffer(buf, dtype=self.dtype).reshape((count, *self.shape[1:]))


def _npz_members(path: Path, specs: list[InputSpec]) -> dict[str, _NpyMember]:
    try:
        with zipfile.ZipFile(path) as zf:
            names = {n[:-4]: n for n in zf.namelist() if n.endswith(".npy")}
        members = {key: _NpyMember(path, member) for key, member in names.items()}
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise UserError(f"{path}: not a readable .npz file ({exc})") from None
    for spec in specs:
        if spec.name not in members:
            have = ", ".join(sorted(members)) or "nothing"
            raise UserError(f"{path}: no array named '{spec.name}' for model input '{spec.name}' (the file has {have})")
    extra = set(members) - {s.name for s in specs}
    if extra:
        raise UserError(f"{path}: array '{sorted(extra)[0]}' is not an input of the model (inputs: {', '.join(s.name for s in specs)})")
    counts = set()
    for spec in specs:
        member = members[spec.name]
        per_feed = len(member.shape) == len(spec.shape) + 1
        if per_feed:
            _check_shape(member.shape[1:], spec, str(path))
        else:
            _check_shape(member.shape, spec, str(path), skip_first=True)
            fixed = _fixed_batch(spec)
            if fixed and member.shape and member.shape[0] % fixed:
                raise UserError(f"{path}: array '{spec.name}' holds {member.shape[0]} samples, not a multiple of the "
                                f"model's fixed batch size {fixed}")
        if not member.shape:
            raise UserError(f"{path}: array '{spec.name}' is a scalar; the first axis must count samples")
        counts.add(member.shape[0])
    if len(counts) > 1:
        raise UserError(f"{path}: arrays hold different numbers of samples ({sorted(counts)})")
    return members


def _fixed_batch(spec: InputSpec) -> int | None:
    """The input's first dimension when it is a fixed number (many exports fix batch = 1)."""
    return spec.shape[0] if spec.shape and isinstance(spec.shape[0], int) else None


def _npz_feeds(path: Path, specs: list[InputSpec], batch_size: int) -> Iterator[Feed]:
    members = _npz_members(path, specs)
    per_feed = {s.name: len(members[s.name].shape) == len(s.shape) + 1 for s in specs}
    streams = {
        s.name: members[s.name].chunks(1 if per_feed[s.name] else (_fixed_batch(s) or batch_size)) for s in specs
    }
    for parts in zip(*streams.values()):
        feed = {}
        for name, part in zip(streams, parts):
            feed[name] = part[0] if per_feed[name] else part
        yield feed


def _function_source(spec: str, specs: list[InputSpec]) -> Callable[[], Iterator[Feed]]:
    target, func_name = spec.rsplit(":", 1)
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise UserError(f"--calib {spec}: no such file '{target}'")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's module failed to import
        raise UserError(f"--calib {spec}: cannot import '{target}' ({type(exc).__name__}: {exc})") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise UserError(f"--calib {spec}: '{target}' has no function '{func_name}'")

    def make() -> Iterator[Feed]:
        result = func()
        try:
            return iter(result)
        except TypeError:
            raise UserError(f"--calib {spec}: '{func_name}' must return an iterable of feed dicts") from None

    return make


def open_calibration(spec: str | None, model: ir.Model, *, batch_size: int = 16, seed: int = 0) -> Calibration | None:
    """Turn a ``--calib`` value into a validated ``Calibration`` for ``model`` (None stays None)."""
    if spec is None:
        return None
    specs = input_specs(model)
    if spec.startswith("random:"):
        try:
            count = int(spec.split(":", 1)[1])
        except ValueError:
            count = 0
        if count <= 0:
            raise UserError(f"--calib {spec}: write random:N with N a positive number of samples")
        warnings.warn(f"--calib {spec}: random calibration data gives poor quantization and pruning results; "
                      "pass real samples (.npz) for real use", stacklevel=2)

        def make_random() -> Iterator[Feed]:
            rng = np.random.default_rng(seed)
            for start in range(0, count, batch_size):
                yield random_feed(specs, min(batch_size, count - start), rng)

        return Calibration(spec, make_random, specs, random=True, num_samples=count)
    path = Path(spec)
    if path.is_dir():
        files = sorted(path.glob("*.npz"))
        if not files:
            raise UserError(f"--calib {spec}: the folder holds no .npz files")
        for file in files:
            _npz_members(file, specs)
        return Calibration(spec, lambda: itertools.chain.from_iterable(_npz_feeds(f, specs, batch_size) for f in files), specs)
    if path.suffix == ".npz" or path.exists():
        if not path.is_file():
            raise UserError(f"--calib {spec}: no such file")
        members = _npz_members(path, specs)
        count = next(iter(members.values())).shape[0]
        return Calibration(str(path), lambda: _npz_feeds(path, specs, batch_size), specs, num_samples=count)
    if ":" in spec:
        return Calibration(spec, _function_source(spec, specs), specs)
    raise UserError(f"--calib {spec}: not a file, folder, random:N or module:function")
