"""Raise a model's ai.onnx opset in place, through onnx's version converter (``core.target``
lowers it the same way, with ``take_converted``).

Needed when a pass emits operators or types newer than the model's opset (e.g. blocked int4
``DequantizeLinear`` needs opset 21, int2 needs 25). The converter rewrites nodes whose
signature changed between versions (ReduceMean's axes becoming an input, Split's sizes…), so a
plain bump of the opset number would be wrong. Raises ``UserError`` naming the versions when the
converter cannot handle the model. The converter drops node metadata (e.g. ``rotate``'s
``lowbit.role`` marks, which keep its online rotations out of the quantizer), so it is copied back
by node name.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir

from lowbit.core.errors import UserError


def upgrade(model: ir.Model, version: int) -> None:
    current = model.opset_imports.get("", 1)
    if current >= version:
        return
    proto = ir.serde.serialize_model(model)
    try:
        converted = onnx.version_converter.convert_version(proto, version)
    except Exception as exc:  # noqa: BLE001 - the converter raises many types
        raise UserError(f"cannot raise the model from opset {current} to {version} (needed for the quantized "
                        f"operators): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    take_converted(model, converted, version)


def take_converted(model: ir.Model, converted: onnx.ModelProto, version: int) -> None:
    """Make ``converted`` (``model`` through the version converter, at ai.onnx ``version``) the
    graph of ``model``, with the node metadata the converter dropped copied back by node name."""
    new = ir.serde.deserialize_model(converted)
    metadata = {node.name: dict(node.metadata_props) for node in model.graph.all_nodes() if node.metadata_props}
    for node in new.graph.all_nodes():
        node.metadata_props.update(metadata.get(node.name, {}))
    model.graph = new.graph
    model.opset_imports[""] = version
    model.graph.opset_imports[""] = version
