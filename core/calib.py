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
by the number of samples. A model with a fixed batch size only ever gets feeds of that size:
``Calibration.first`` returns the first feed as it is, ``Calibration.batches`` several of them.

Sizes of symbolic dimensions, when lowbit must invent inputs (``random_feed``: ``random:N``, the
verifier and ``lowbit compare`` without ``--calib``, shape inference for MACs), in this order:
a symbol on the first axis of any input is the *batch* (the caller's batch size); a symbol used
anywhere else except an image's spatial axes is a *sequence* length, ``DEFAULT_SEQ`` = 16; the
spatial axes of an image — a float input of rank 4 whose dims 2 and 3 are symbolic ([N, C, H, W]),
or whose dims 1 and 2 are symbolic and dim 3 is at most 4 ([N, H, W, C]) — get ``DEFAULT_IMAGE``
= 224 (7 · 32: divisible by the strides 8, 16 and 32 of detection and classification networks,
and ImageNet's crop size). A symbol keeps one size everywhere it appears. These are guesses; a
model that needs other sizes is given them with ``--input-shape NAME=D0,D1,…`` (``parse_input_shapes``,
``apply_input_shapes``), which replaces the symbols in the model's input types when it is loaded.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import itertools
import re
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx_ir as ir

from lowbit.core.errors import UserError, did_you_mean

Feed = dict[str, np.ndarray]

#: size of a symbolic non-batch, non-image dimension (a sequence length) in invented inputs
DEFAULT_SEQ = 16
#: height and width of a symbolic-size image in invented inputs (a multiple of 32)
DEFAULT_IMAGE = 224


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


def spatial_axes(spec: InputSpec) -> tuple[int, ...]:
    """The axes of ``spec`` that are an image's symbolic height and width (see the module doc)."""
    shape = spec.shape
    if len(shape) != 4 or not np.issubdtype(spec.dtype, np.floating):
        return ()
    symbolic = [not isinstance(d, int) for d in shape]
    if symbolic[2] and symbolic[3]:
        return (2, 3)  # [N, C, H, W]
    if symbolic[1] and symbolic[2] and isinstance(shape[3], int) and shape[3] <= 4:
        return (1, 2)  # [N, H, W, C]
    return ()


def symbol_sizes(specs: list[InputSpec], batch: int, *, seq: int | None = None,
                 image: int | None = None) -> dict[str, int]:
    """Size of every named symbolic dimension of the inputs: ``batch`` on a first axis, else
    ``seq`` (default ``DEFAULT_SEQ``), else — only on an image's spatial axes — ``image``
    (default ``DEFAULT_IMAGE``)."""
    seq = DEFAULT_SEQ if seq is None else seq
    image = DEFAULT_IMAGE if image is None else image
    rank = {"batch": 0, "seq": 1, "image": 2}
    roles: dict[str, str] = {}
    for spec in specs:
        spatial = spatial_axes(spec)
        for axis, d in enumerate(spec.shape):
            if isinstance(d, int) or not d:
                continue
            role = "batch" if axis == 0 else "image" if axis in spatial else "seq"
            if d not in roles or rank[role] < rank[roles[d]]:
                roles[d] = role
    size = {"batch": batch, "seq": seq, "image": image}
    return {symbol: size[role] for symbol, role in roles.items()}


def concrete_shape(spec: InputSpec, sizes: dict[str, int], batch: int, *, seq: int | None = None,
                   image: int | None = None) -> tuple[int, ...]:
    """``spec``'s shape with every symbolic dimension given a size (``symbol_sizes`` for named
    ones; unnamed ones by position, with the same rules)."""
    spatial = spatial_axes(spec)
    dims = []
    for axis, d in enumerate(spec.shape):
        if isinstance(d, int):
            dims.append(d)
        elif d and d in sizes:
            dims.append(sizes[d])
        elif axis == 0:
            dims.append(batch)
        elif axis in spatial:
            dims.append(DEFAULT_IMAGE if image is None else image)
        else:
            dims.append(DEFAULT_SEQ if seq is None else seq)
    return tuple(dims)


def random_feed(specs: list[InputSpec], batch: int, rng: np.random.Generator, *, seq: int | None = None,
                image: int | None = None) -> Feed:
    """A random feed: standard normal floats, in-range indices, all-ones masks.

    Symbolic dimensions get sizes as the module docstring says: ``batch`` on the first axis,
    ``seq`` (default ``DEFAULT_SEQ``) for sequence-like dims, ``image`` (default
    ``DEFAULT_IMAGE``) for an image's height and width; a symbol has one size in every input.
    """
    sizes = symbol_sizes(specs, batch, seq=seq, image=image)
    feed = {}
    for spec in specs:
        shape = concrete_shape(spec, sizes, batch, seq=seq, image=image)
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


def fixed_batch(specs: list[InputSpec]) -> int | None:
    """The batch size the model fixes (the first dimension of its inputs, when a number), or None."""
    for spec in specs:
        fixed = _fixed_batch(spec)
        if fixed:
            return fixed
    return None


def describe_feed(specs: list[InputSpec], feed: Feed, *, guessed: bool) -> str:
    """``images [4,3,224,224] (batch, height, width guessed)`` for each input, for error messages."""
    parts = []
    for spec in specs:
        if spec.name not in feed:
            continue
        shape = "[" + ",".join(str(d) for d in np.shape(feed[spec.name])) + "]"
        loose = [d if d else f"dim {i}" for i, d in enumerate(spec.shape) if not isinstance(d, int)]
        text = f"{spec.name} {shape}"
        if guessed and loose:
            text += f" ({', '.join(dict.fromkeys(loose))} guessed)"
        parts.append(text)
    return ", ".join(parts)


def merge_specs(specs_a: list[InputSpec], specs_b: list[InputSpec], label_a: str, label_b: str) -> list[InputSpec]:
    """``specs_a`` with every dimension that either model fixes fixed: data both models accept
    (``lowbit compare`` of a dynamic model with a copy pinned by ``--input-shape``). The inputs
    must have the same names and dtypes; a dimension the two fix differently is a ``UserError``."""
    b_by_name = {s.name: s for s in specs_b}
    merged = []
    for a in specs_a:
        b = b_by_name.get(a.name)
        if b is None:
            merged.append(a)
            continue
        clash = len(a.shape) != len(b.shape) or any(
            isinstance(x, int) and isinstance(y, int) and x != y for x, y in zip(a.shape, b.shape))
        if clash:
            raise UserError(f"{label_b}: input '{a.name}' is {b.describe()} but in {label_a} it is {a.describe()}; "
                            "the two models cannot run the same data")
        shape = tuple(y if isinstance(y, int) and not isinstance(x, int) else x for x, y in zip(a.shape, b.shape))
        merged.append(dataclasses.replace(a, shape=shape))
    return merged


# ---------------------------------------------------------------------------------------------
# --input-shape
# ---------------------------------------------------------------------------------------------

_OPTION = "--input-shape"


def parse_input_shapes(texts, *, option: str = _OPTION) -> dict[str | None, tuple[int | None, ...]]:
    """``["images=1,3,320,320", …]`` → ``{"images": (1, 3, 320, 320)}``.

    A dimension written ``?`` is left as the model has it. The name may be left out (``1,3,320,320``)
    when the model has one input. A mapping of name → sequence of ints is accepted as it is.
    """
    if isinstance(texts, dict):
        items = [(name, list(dims), f"{name}={','.join(str(d) for d in dims)}") for name, dims in texts.items()]
    else:
        items = []
        for text in texts:
            text = str(text).strip()
            name, eq, dims = text.rpartition("=")
            if not eq:
                name = None
            items.append((name, dims.split(",") if dims.strip() else [], text))
    shapes: dict[str | None, tuple[int | None, ...]] = {}
    for name, dims, text in items:
        if name == "":
            raise UserError(f"{option} {text}: write NAME=D0,D1,… with the model input's name before '='")
        if not dims:
            raise UserError(f"{option} {text}: give the dimensions as positive integers separated by commas, "
                            "e.g. images=1,3,320,320")
        parsed = []
        for d in dims:
            token = str(d).strip()
            if token == "?":
                parsed.append(None)
                continue
            if isinstance(d, bool) or not re.fullmatch(r"[+-]?[0-9]+", token):
                raise UserError(f"{option} {text}: '{token}' is not a dimension; give positive integers "
                                "(or ? to keep the model's own) separated by commas")
            if int(token) <= 0:
                raise UserError(f"{option} {text}: dimension {len(parsed)} of input '{name or '?'}' is {token}; "
                                "dimensions must be positive integers")
            parsed.append(int(token))
        if name in shapes:
            raise UserError(f"{option} {text}: input '{name or '?'}' is given twice")
        shapes[name] = tuple(parsed)
    return shapes


def apply_input_shapes(model: ir.Model, shapes, *, option: str = _OPTION) -> dict[str, list[int | str | None]]:
    """Pin the model's symbolic input dimensions, in place; return every input's new shape.

    ``shapes`` is what ``parse_input_shapes`` takes or returns. Each pinned input's type gets the
    given dimensions; a symbol pinned that way gets the same value everywhere it appears (other
    inputs, outputs and intermediate annotations). Refused with a ``UserError`` naming the input
    and ``option``: an unknown input, the wrong number of dimensions, a dimension that contradicts
    one the model fixes, a symbol given two values. Returns {} when ``shapes`` is empty.
    """
    if not shapes:
        return {}
    if not isinstance(shapes, dict) or any(not isinstance(v, tuple) for v in shapes.values()):
        shapes = parse_input_shapes(shapes, option=option)
    inputs = [v for v in model.graph.inputs if v.name not in model.graph.initializers]
    by_name = {v.name: v for v in inputs}
    names = ", ".join(by_name) or "none"
    symbols: dict[str, int] = {}
    pinned: dict[str, list] = {}
    for name, dims in shapes.items():
        written = ",".join("?" if d is None else str(d) for d in dims)
        text = f"{option} {name}={written}" if name is not None else f"{option} {written}"
        if name is None:
            if len(inputs) != 1:
                raise UserError(f"{text}: the model has {len(inputs)} inputs ({names}); write NAME=D0,D1,… "
                                "to say which one")
            name = inputs[0].name
        value = by_name.get(name)
        if value is None:
            raise UserError(f"{text}: the model has no input '{name}' (inputs: {names}){did_you_mean(name, by_name)}")
        current = list(value.shape.dims) if value.shape is not None else [None] * len(dims)
        shown = "[" + ", ".join(str(d) if isinstance(d, int) else (str(d.value) if isinstance(d, ir.SymbolicDim)
                                                                    and d.value else "?") for d in current) + "]"
        if value.shape is not None and len(current) != len(dims):
            raise UserError(f"{text}: input '{name}' has {len(current)} dimensions {shown}, not {len(dims)}")
        new = []
        for axis, (have, want) in enumerate(zip(current, dims)):
            if want is None:
                new.append(have)
                continue
            if isinstance(have, int):
                if have != want:
                    raise UserError(f"{text}: dimension {axis} of input '{name}' is fixed to {have} by the model "
                                    f"{shown}, not {want}")
            elif isinstance(have, ir.SymbolicDim) and have.value:
                if symbols.setdefault(have.value, want) != want:
                    raise UserError(f"{text}: dimension {axis} of input '{name}' is '{have.value}', which another "
                                    f"{option} sets to {symbols[have.value]}, not {want}")
            new.append(want)
        pinned[name] = new
    for value in inputs:
        if value.name in pinned:
            value.shape = ir.Shape(pinned[value.name])
    for graph in model.graphs():
        for value in _annotated_values(graph):
            if value.shape is not None and symbols:
                dims = [symbols.get(d.value, d) if isinstance(d, ir.SymbolicDim) and d.value else d
                        for d in value.shape.dims]
                if dims != list(value.shape.dims):
                    value.shape = ir.Shape(dims)
    return {v.name: _dims_of(v) for v in inputs}


def _annotated_values(graph: ir.Graph):
    yield from graph.inputs
    for node in graph:
        yield from node.outputs
    seen = {id(v) for node in graph for v in node.outputs}
    seen |= {id(v) for v in graph.inputs}
    yield from (v for v in graph.outputs if id(v) not in seen)


def _dims_of(value: ir.Value) -> list[int | str | None]:
    if value.shape is None:
        return []
    return [d if isinstance(d, int) else (d.value if isinstance(d, ir.SymbolicDim) else None) for d in value.shape.dims]


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

    @property
    def fixed_batch(self) -> int | None:
        """The batch size the model fixes (every feed has exactly that many samples), or None."""
        return fixed_batch(self.specs)

    def batches(self, max_samples: int) -> list[Feed]:
        """The first feeds, whole, until they hold at least ``max_samples`` samples (at least one)."""
        feeds: list[Feed] = []
        count = 0
        for feed in self:
            feeds.append(feed)
            count += _batch_len(feed)
            if count >= max_samples:
                break
        if not feeds:
            raise UserError(f"{self.label}: the calibration data holds no samples")
        return feeds

    def first(self, max_samples: int) -> Feed:
        """The first samples (at most ``max_samples``) as one feed, for verification.

        A model with a fixed batch size cannot run a feed of any other size, so for it this is
        the first feed as it is (its fixed batch, even when that is more than ``max_samples``);
        ``batches`` gives more samples as several feeds."""
        if self.fixed_batch:
            return self.batches(1)[0]
        parts = self.batches(max_samples)
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


def open_calibration(spec: str | None, model: ir.Model, *, batch_size: int = 16, seed: int = 0,
                     specs: list[InputSpec] | None = None) -> Calibration | None:
    """Turn a ``--calib`` value into a validated ``Calibration`` for ``model`` (None stays None).

    ``specs``: check the data against these instead of ``input_specs(model)`` (``compare`` passes
    the inputs of both models, so that data fits both)."""
    if spec is None:
        return None
    specs = input_specs(model) if specs is None else specs
    if spec.startswith("random:"):
        try:
            count = int(spec.split(":", 1)[1])
        except ValueError:
            count = 0
        if count <= 0:
            raise UserError(f"--calib {spec}: write random:N with N a positive number of samples")
        warnings.warn(f"--calib {spec}: random calibration data gives poor quantization and pruning results; "
                      "pass real samples (.npz) for real use", stacklevel=2)

        step = fixed_batch(specs) or batch_size  # a fixed batch size makes every feed that size

        def make_random() -> Iterator[Feed]:
            rng = np.random.default_rng(seed)
            for start in range(0, count, step):
                yield random_feed(specs, min(step, count - start), rng)

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
