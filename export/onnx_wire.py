"""Which graph inputs and outputs declare a shape, read from the ONNX file's protobuf bytes.

onnxruntime reports an input of unknown rank and a scalar input alike, as shape `[]`, and
import must tell them apart (a scalar can be a constant; an unknown rank cannot be served)
without the `onnx` package, which serving installs do not have. The answer is one field
deep in the file, so it is read from the protobuf wire format directly:

    ModelProto.graph (7) -> GraphProto.input (11) / .output (12) -> ValueInfoProto
    ValueInfoProto.name (1), .type (2) -> TypeProto.tensor_type (1) -> .shape (2)

A tensor whose `shape` field is present has a fixed rank (a scalar's is present and
empty). Everything else in the file (weights included) is skipped by its length.
"""

from __future__ import annotations

from collections.abc import Iterator

from .errors import ExportError

MODEL_GRAPH = 7
GRAPH_INPUT, GRAPH_OUTPUT = 11, 12
VALUE_NAME, VALUE_TYPE = 1, 2
TYPE_TENSOR = 1
TENSOR_SHAPE = 2

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5


def _varint(data: memoryview, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data):
            raise ValueError("truncated varint")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7


def _fields(data: memoryview) -> Iterator[tuple[int, int, memoryview | int]]:
    """(field number, wire type, value) of one message: a sub-view for length-delimited
    fields, the integer for varints; fixed-width fields are yielded as 0."""
    at = 0
    while at < len(data):
        tag, at = _varint(data, at)
        number, wire = tag >> 3, tag & 7
        if wire == VARINT:
            value, at = _varint(data, at)
        elif wire == LENGTH:
            size, at = _varint(data, at)
            if at + size > len(data):
                raise ValueError("truncated field")
            value, at = data[at : at + size], at + size
        elif wire in (FIXED64, FIXED32):
            value, at = 0, at + (8 if wire == FIXED64 else 4)
        else:  # groups (3, 4) are not used by onnx.proto
            raise ValueError(f"unexpected wire type {wire}")
        yield number, wire, value


def _submessages(data: memoryview, number: int) -> Iterator[memoryview]:
    for n, wire, value in _fields(data):
        if n == number and wire == LENGTH:
            yield value


def _has_shape(value_info: memoryview) -> tuple[str, bool]:
    name, ranked = "", False
    for n, wire, value in _fields(value_info):
        if n == VALUE_NAME and wire == LENGTH:
            name = bytes(value).decode("utf-8", "replace")
        elif n == VALUE_TYPE and wire == LENGTH:
            for tensor in _submessages(value, TYPE_TENSOR):
                ranked = ranked or any(True for _ in _submessages(tensor, TENSOR_SHAPE))
    return name, ranked


def ranked_tensors(model_bytes: bytes) -> dict[str, bool]:
    """Name -> whether its shape (and so its rank) is declared, for every graph input and
    output."""
    try:
        ranked: dict[str, bool] = {}
        for graph in _submessages(memoryview(model_bytes), MODEL_GRAPH):
            for field in (GRAPH_INPUT, GRAPH_OUTPUT):
                for value_info in _submessages(graph, field):
                    name, has = _has_shape(value_info)
                    ranked[name] = has
        return ranked
    except ValueError as e:
        raise ExportError(f"cannot read the graph's input and output types: {e}") from e
