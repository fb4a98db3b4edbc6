"""Load and save ONNX models as ``onnx_ir`` models, refusing bad files with one clear sentence.

Loading checks, in order: the path exists and is a non-empty file; its bytes parse as an ONNX
``ModelProto`` (a PNG, text or truncated file does not); the graph is well formed (the ONNX
checker, which also catches a protobuf cut at a field boundary); every external-data reference
stays inside the model's folder and points at a file long enough for its offset and length; and
the ``ai.onnx`` opset is one the installed onnxruntime can run.

Saving is atomic: the model is written to a temporary file in the destination folder and renamed
over the destination, so a crash never leaves a half-written model and the input is never touched.
``ir_version`` is lowered to the smallest version that can express the model's opsets and element
types (IR 10 — what onnxruntime 1.20 reads — unless e.g. opset 25 int2 types need more), and
tensors go to an external data file when the model would exceed protobuf's 2 GB limit, or when
asked to.
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from lowbit.core.errors import UserError

#: protobuf cannot serialise messages of 2 GiB or more; stay clear of it.
PROTOBUF_LIMIT_BYTES = 2 * 1024**3 - 64 * 1024**2
#: onnxruntime 1.20 reads IR 10 / opset 21: the floor we write when nothing needs more.
BASE_IR_VERSION = 10
_DTYPE_MIN_IR = {
    ir.DataType.FLOAT4E2M1: 11,
    ir.DataType.INT2: 13,
    ir.DataType.UINT2: 13,
}

_MAGIC = {
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"PK\x03\x04": "a zip archive (a .npz or .pt file?)",
    b"GIF8": "a GIF image",
    b"%PDF": "a PDF document",
    b"\x7fELF": "an executable",
}


def _describe_foreign(head: bytes) -> str | None:
    for magic, what in _MAGIC.items():
        if head.startswith(magic):
            return what
    return None


@functools.lru_cache(maxsize=None)
def ort_limits() -> tuple[int, int]:
    """(max IR version, max ai.onnx opset) that the installed onnxruntime loads, probed once."""
    import onnxruntime as ort

    def loads(ir_version: int, opset: int) -> bool:
        x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
        y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
        graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
        proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
        proto.ir_version = ir_version
        try:
            ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        except Exception:  # noqa: BLE001 - any refusal means "not supported"
            return False
        return True

    max_opset = onnx.defs.onnx_opset_version()
    while max_opset > 21 and not loads(BASE_IR_VERSION, max_opset):
        max_opset -= 1
    max_ir = onnx.IR_VERSION
    while max_ir > BASE_IR_VERSION and not loads(max_ir, 21):
        max_ir -= 1
    return max_ir, max_opset


def min_ir_version(model: ir.Model) -> int:
    """Smallest IR version that can hold the model's ai.onnx opset and element types."""
    opset = model.opset_imports.get("", 1)
    needed = BASE_IR_VERSION
    for _release, ir_version, ai_onnx, *_ in onnx.helper.VERSION_TABLE:
        if ai_onnx >= opset:
            needed = max(needed, ir_version)
            break
    for value in _all_values(model):
        dtype = value.dtype
        if dtype in _DTYPE_MIN_IR:
            needed = max(needed, _DTYPE_MIN_IR[dtype])
    return needed


def _all_values(model: ir.Model):
    for graph in model.graphs():
        yield from graph.inputs
        yield from graph.initializers.values()
        for node in graph:
            yield from node.outputs


def load(path: str | os.PathLike, *, check_opset: bool = True) -> ir.Model:
    """Load ``path`` as an ``onnx_ir`` model, or raise ``UserError`` saying what is wrong with it."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not an ONNX model file")
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"{path}: the file is empty, not an ONNX model")
    with open(path, "rb") as f:
        head = f.read(16)
    foreign = _describe_foreign(head)
    if foreign:
        raise UserError(f"{path}: the file is {foreign}, not an ONNX model")
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a readable ONNX model (truncated or corrupt protobuf: {_first_line(exc)})") from None
    if not proto.HasField("graph") or not proto.opset_import:
        raise UserError(f"{path}: not an ONNX model (no graph or no opset import; truncated or not ONNX)")
    _check_external_data(path, proto)
    try:
        # Checked by path so that external data is resolved against the model's folder.
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise UserError(f"{path}: invalid or truncated ONNX model ({_first_line(exc)})") from None
    if check_opset:
        _check_opset(path, proto)
    model = ir.serde.deserialize_model(proto)
    ir.external_data.set_base_dir(model.graph, str(path.parent))
    if tensor_bytes(model) <= PROTOBUF_LIMIT_BYTES:
        # Small enough to hold in memory: later stages (onnxruntime sessions built from bytes,
        # saving elsewhere) then never depend on the input's data file again.
        _load_external_tensors(model)
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


def _external_refs(proto: onnx.ModelProto):
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {entry.key: entry.value for entry in tensor.external_data}
            yield tensor.name, info


def _check_external_data(path: Path, proto: onnx.ModelProto) -> None:
    folder = path.parent.resolve()
    for name, info in _external_refs(proto):
        location = info.get("location", "")
        where = f"{path}: initializer '{name}'"
        if not location:
            raise UserError(f"{where} is marked external but names no data file")
        if os.path.isabs(location) or Path(location).drive:
            raise UserError(f"{where} points at the absolute path '{location}'; external data must sit in the model's folder")
        target = (folder / location).resolve()
        if folder != target and folder not in target.parents:
            raise UserError(f"{where} points at '{location}', outside the model's folder")
        if not target.is_file():
            raise UserError(f"{where} needs the external data file '{location}', which is missing")
        offset = int(info.get("offset", 0) or 0)
        length = info.get("length")
        if length is not None and offset + int(length) > target.stat().st_size:
            raise UserError(f"{where} reads past the end of '{location}' (truncated external data)")


def _check_opset(path: Path, proto: onnx.ModelProto) -> None:
    import onnxruntime as ort

    _, max_opset = ort_limits()
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > max_opset:
            raise UserError(
                f"{path}: uses ai.onnx opset {opset.version}, but onnxruntime {ort.__version__} runs at most "
                f"opset {max_opset}; re-export with opset {max_opset} or lower"
            )


def tensor_bytes(model: ir.Model) -> int:
    """Bytes held by the model's initializers (what decides protobuf's 2 GB limit)."""
    total = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += value.const_value.nbytes
    return total


def check_output_path(out: str | os.PathLike, inputs: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Refuse, before any work is done, an output path that cannot or must not be written."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{out}: output path is a folder; give a file name such as {out / 'model.onnx'}")
    if not out.resolve().parent.is_dir():
        raise UserError(f"{out}: the output folder '{out.parent}' does not exist")
    for src in inputs:
        src = Path(src)
        if src.exists() and (out.resolve() == src.resolve() or (out.exists() and os.path.samefile(out, src))):
            raise UserError(f"{out}: output path is the input model; choose another name so the input stays unchanged")
    return out


def save(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None,
         ir_version: int | None = None) -> Path:
    """Write ``model`` to ``path`` atomically, with ir_version capped for onnxruntime ≥ 1.20.

    ``external_data=None`` writes tensors to ``<name>.data`` beside the model only if the model
    would not fit in one protobuf; ``True`` always does; ``False`` never does (and fails for
    models over 2 GB). ``ir_version`` overrides the capped version (``--target-ort`` sets the
    smallest the model needs, below IR 10 for onnxruntime 1.17). The model object itself is left
    as it was.
    """
    path = check_output_path(path)
    if external_data is None:
        external_data = tensor_bytes(model) > PROTOBUF_LIMIT_BYTES
    folder = path.parent if str(path.parent) else Path(".")
    old_ir = model.ir_version
    model.ir_version = min_ir_version(model) if ir_version is None else ir_version
    if not external_data:
        _load_external_tensors(model)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        os.chmod(tmp, default_file_mode())  # mkstemp makes 0600; a saved model is an ordinary file
        data_name = f"{path.name}.data" if external_data else None
        ir.save(model, tmp, external_data=data_name, size_threshold_bytes=0)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        model.ir_version = old_ir
    return path


def _load_external_tensors(model: ir.Model) -> None:
    """Bring tensors that still live in the input's data file into memory before an inline save."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                value.const_value = ir.Tensor(value.const_value.numpy(), name=value.name)


def default_file_mode() -> int:
    """The mode ``open()`` would give a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """Serialise to a ``ModelProto`` with the same ir_version capping ``save`` applies."""
    proto = ir.serde.serialize_model(model)
    proto.ir_version = min_ir_version(model)
    return proto


def to_bytes(model: ir.Model) -> bytes:
    """The model as bytes, for onnxruntime sessions (models under 2 GB only)."""
    return to_proto(model).SerializeToString()


def initializer_array(value: ir.Value) -> np.ndarray:
    """A numpy view of a constant value (initializer or Constant-folded), or raise if not constant."""
    if value.const_value is None:
        raise ValueError(f"value '{value.name}' is not a constant")
    return value.const_value.numpy()
