"""The Open Inference Protocol (KServe v2 REST) wire codec: request bytes in, validated numpy
tensors out; tensors in, response bytes out. Pure functions: no HTTP framework, no server state.

It speaks what stock `tritonclient[http]` sends and expects, including Triton's two extensions:

- binary tensor data: a tensor whose `parameters.binary_data_size` is N has no JSON `data`;
  its N bytes follow the JSON header in the body, tensors in input order, the header's length
  given by the `Inference-Header-Content-Length` HTTP header. Binary data is little-endian,
  row-major, unpadded; a BOOL is one byte (0 or 1); a BYTES element is a 4-byte little-endian
  length and then that many bytes. Outputs come back the same way when the request asks for it
  (per output `parameters.binary_data`, else the request's `parameters.binary_data_output`).
- sequences: `parameters.sequence_id` (a uint64 or a string) with `sequence_start` and
  `sequence_end`, which a stateful model uses to find and reset its state.

Datatypes (the v2 names, the only ones accepted):

| v2     | numpy   | JSON `data` element               | binary element        |
|--------|---------|-----------------------------------|-----------------------|
| BOOL   | bool    | true / false                      | 1 byte, 0 or 1        |
| UINT8  | uint8   | integer in range                  | 1 byte                |
| UINT16 | uint16  | integer in range                  | 2 bytes LE            |
| UINT32 | uint32  | integer in range                  | 4 bytes LE            |
| UINT64 | uint64  | integer in range                  | 8 bytes LE            |
| INT8   | int8    | integer in range                  | 1 byte                |
| INT16  | int16   | integer in range                  | 2 bytes LE            |
| INT32  | int32   | integer in range                  | 4 bytes LE            |
| INT64  | int64   | integer in range                  | 8 bytes LE            |
| FP16   | float16 | number, NaN, Infinity, -Infinity  | 2 bytes LE (IEEE half)|
| FP32   | float32 | number, NaN, Infinity, -Infinity  | 4 bytes LE            |
| FP64   | float64 | number, NaN, Infinity, -Infinity  | 8 bytes LE            |
| BYTES  | object  | string (its UTF-8 bytes)          | 4-byte LE length + bytes |

Design:

- One parse path. Every input goes through the same checks (name, datatype, shape, element
  count) and then one of two element decoders, `_from_json` or `_from_binary`, that both
  return a flat array of exactly the declared element count; reshaping is common.
- Nothing is allocated from a declared size. A shape is only arithmetic until it is compared
  with what the body carries: JSON data must hold exactly that many elements, binary data
  exactly that many bytes, and those are bounded by the body. So `[2**40]` costs nothing.
- Every problem a client can cause raises `InvalidV2Request` (400) with a message that names
  the input or field and says what was expected; any other exception is a bug here.
- Strict where the protocol is precise (its field names, datatypes, shapes, JSON types: no
  1.0 for an INT, no 1 for a BOOL, no duplicate keys), lenient where it is open (custom
  request parameters pass through; per-tensor parameters other than the binary and
  shared-memory ones, e.g. KServe's `content_type`, are ignored).

Choices where the protocol is silent or Triton differs:

- NaN and ±Infinity: Triton parses and writes them as the bare JSON tokens `NaN`, `Infinity`
  and `-Infinity` (its rapidjson runs with kParseNanAndInfFlag / kWriteNanAndInfFlag), and
  tritonclient reads and writes them too, so this codec does the same. They are not strict
  JSON: a client with a strict parser should ask for such outputs as binary.
- FP16 in JSON: Triton refuses it both ways; here it is accepted and written, because every
  half-precision value is exactly a double, so it round-trips like FP32 does.
- BYTES in JSON: request strings become their UTF-8 bytes. An output element that is not
  UTF-8 cannot be a JSON string, so asking for that output as JSON is a 400 that says to ask
  for it binary (Triton writes such bytes raw, which is not valid JSON).
- A `sequence_id` of 0 or "" (in the protocol: "not in a sequence") is refused: omit it.
- A JSON number that overflows the datatype is refused, floats included (1e39 for FP32),
  rather than silently becoming infinity; a float for an INT datatype is refused.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass

import numpy as np

from .errors import InvalidV2Request

DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
_NAMES = {dtype: name for name, dtype in DATATYPES.items()}

HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_RANK = 32  # numpy 1.x's limit (2.x allows 64); no model here comes close
_MAX_DIM = 2**63 - 1  # Triton's dims are int64
_UINT64_MAX = 2**64 - 1
_SEQUENCE_KEYS = ("sequence_id", "sequence_start", "sequence_end")
# Parameters whose meaning this server cannot honour: refused rather than silently ignored,
# since a client that asks for shared memory or a classification would misread the answer.
_UNSUPPORTED_TENSOR_PARAMETERS = (
    "shared_memory_region", "shared_memory_byte_size", "shared_memory_offset", "classification",
)


def v2_datatype(dtype) -> str:
    """The v2 name of a numpy dtype (the inverse of DATATYPES); either byte order."""
    dt = np.dtype(dtype)
    name = _NAMES.get(dt.newbyteorder("=")) if dt.kind != "O" else "BYTES"
    if name is None:
        raise ValueError(f"numpy dtype {dt} has no v2 datatype")
    return name


@dataclass(frozen=True)
class TensorMeta:
    """What a model declares for one input or output."""

    name: str
    datatype: str  # v2 datatype, e.g. "FP32"
    shape: tuple[int, ...]  # -1 where dynamic


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool | None  # parameters.binary_data of that output; None if unset


@dataclass(frozen=True)
class Sequence:
    id: int | str  # 1..2**64-1 or a non-empty string
    start: bool
    end: bool


@dataclass
class InferRequest:
    id: str | None
    inputs: dict[str, np.ndarray]  # BYTES: dtype=object arrays of bytes; in request order
    outputs: list[RequestedOutput] | None  # None: all outputs
    binary_output_default: bool  # parameters.binary_data_output (False if absent)
    parameters: dict  # the request's parameters, sequence_* removed (the rest pass through)
    sequence: Sequence | None


# --- requests -------------------------------------------------------------------------------

def parse_header_length(value: str | None) -> int | None:
    """The Inference-Header-Content-Length header as an int (None when absent).

    Only plain ASCII digits: int() would also take "1_0", " +1" and non-ASCII digits.
    """
    if value is None:
        return None
    text = value.strip()
    if not re.fullmatch(r"[0-9]{1,19}", text):
        raise InvalidV2Request(
            f"{HEADER_LENGTH} must be a byte count (digits only), got {value[:40]!r}")
    return int(text)


def parse_infer_request(body: bytes, header_length: int | str | None) -> InferRequest:
    """Parse and validate a v2 infer request body.

    `header_length` is the Inference-Header-Content-Length header: None when absent (the
    whole body is JSON), else the length of the JSON part; the raw header string is accepted
    too. Raises InvalidV2Request for anything wrong with the request.
    """
    view = memoryview(body).cast("B")
    if isinstance(header_length, str):
        header_length = parse_header_length(header_length)
    if header_length is None:
        json_size = len(view)
    elif isinstance(header_length, bool) or not isinstance(header_length, int):
        raise TypeError(f"header_length must be an int, a str or None, not {header_length!r}")
    elif header_length < 0:
        raise InvalidV2Request(f"{HEADER_LENGTH} is {header_length}; it must not be negative")
    elif header_length > len(view):
        raise InvalidV2Request(
            f"{HEADER_LENGTH} is {header_length}, past the end of the {len(view)}-byte body")
    else:
        json_size = header_length
    doc = _load_json(view[:json_size], has_header=header_length is not None)
    binary = _BinaryPart(view[json_size:], has_header=header_length is not None)

    request = _object(doc, "the request")
    _only_fields(request, "the request", ("id", "parameters", "inputs", "outputs"))
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidV2Request(f"'id' must be a string, got {_kind(request_id)}")
    _check_unicode(request_id, "'id'")

    parameters = _parameters(request.get("parameters"), "the request's 'parameters'")
    sequence = _sequence(parameters)
    binary_output_default = parameters.get("binary_data_output", False)
    if not isinstance(binary_output_default, bool):
        raise InvalidV2Request(
            f"parameters.binary_data_output must be true or false, "
            f"got {_kind(binary_output_default)}")
    for key, value in parameters.items():
        _check_unicode(key, "a parameter name")
        if key not in _SEQUENCE_KEYS and not isinstance(value, str | int | float):
            raise InvalidV2Request(
                f"parameter {key!r} must be a string, number or boolean, got {_kind(value)}")
        if isinstance(value, str):
            _check_unicode(value, f"parameter {key!r}")

    inputs_json = request.get("inputs")
    if not isinstance(inputs_json, list):
        raise InvalidV2Request(
            "'inputs' must be an array of input tensors"
            + ("" if inputs_json is None else f", got {_kind(inputs_json)}"))
    inputs: dict[str, np.ndarray] = {}
    for i, item in enumerate(inputs_json):
        name, array = _input(item, i, binary)
        if name in inputs:
            raise InvalidV2Request(f"input {name!r} is given twice")
        inputs[name] = array
    binary.check_consumed()

    return InferRequest(
        id=request_id,
        inputs=inputs,
        outputs=_requested_outputs(request.get("outputs")),
        binary_output_default=binary_output_default,
        parameters={k: v for k, v in parameters.items() if k not in _SEQUENCE_KEYS},
        sequence=sequence,
    )


class _BinaryPart:
    """The bytes after the JSON header, handed out to binary inputs in order."""

    def __init__(self, data: memoryview, *, has_header: bool) -> None:
        self.data, self.pos, self.has_header = data, 0, has_header

    def take(self, size: int, where: str) -> memoryview:
        if size and not self.has_header:  # an empty tensor needs no bytes, as in Triton
            raise InvalidV2Request(
                f"{where} has binary data (parameters.binary_data_size) but the request has no "
                f"{HEADER_LENGTH} header saying where the JSON ends")
        left = len(self.data) - self.pos
        if size > left:
            raise InvalidV2Request(
                f"{where} has binary_data_size {size} but only {left} bytes of binary data "
                f"are left in the body")
        chunk = self.data[self.pos:self.pos + size]
        self.pos += size
        return chunk

    def check_consumed(self) -> None:
        extra = len(self.data) - self.pos
        if extra:
            raise InvalidV2Request(
                f"the body has {extra} bytes after the JSON header that no input's "
                f"binary_data_size accounts for ({HEADER_LENGTH} may be wrong)")


def _input(item, index: int, binary: _BinaryPart) -> tuple[str, np.ndarray]:
    """One $request_input: the common checks, then one element decoder, then reshape."""
    where = f"inputs[{index}]"
    tensor = _object(item, where)
    _only_fields(tensor, where, ("name", "shape", "datatype", "parameters", "data"))
    name = _name(tensor, where)
    where = f"input {name!r}"
    datatype = tensor.get("datatype")
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise InvalidV2Request(
            f"{where} has datatype {_short(datatype)}; the datatypes are "
            + ", ".join(DATATYPES))
    shape = _shape(tensor.get("shape"), where)
    parameters = _parameters(tensor.get("parameters"), f"{where} 'parameters'")
    _refuse_unsupported(parameters, where)
    count = _element_count(shape, DATATYPES[datatype], where)

    is_binary = "binary_data_size" in parameters
    if is_binary == ("data" in tensor):
        raise InvalidV2Request(
            f"{where} must have exactly one of 'data' and parameters.binary_data_size, "
            + ("got both" if is_binary else "got neither"))
    if is_binary:
        size = parameters["binary_data_size"]
        if type(size) is not int or size < 0:
            raise InvalidV2Request(
                f"{where} parameters.binary_data_size must be a byte count, got {_short(size)}")
        flat = _from_binary(binary, size, datatype, count, shape, where)
    else:
        flat = _from_json(tensor["data"], datatype, count, shape, where)
    return name, flat.reshape(shape)


def _from_json(data, datatype: str, count: int, shape: list[int], where: str) -> np.ndarray:
    """JSON `data`, flat or nested row-major, as a flat array of `count` elements."""
    values = _flatten(data, where)
    if len(values) != count:
        raise InvalidV2Request(
            f"{where} has shape {_fmt(shape)} ({count} elements) but its data has "
            f"{len(values)} elements")
    dtype = DATATYPES[datatype]
    if datatype == "BOOL":
        _first_bad(values, lambda v: type(v) is bool, where, "true or false")
        return np.array(values, dtype=dtype)
    if dtype.kind in "iu":
        # type() rather than isinstance: a bool is an int in Python, not in JSON.
        _first_bad(values, lambda v: type(v) is int, where, f"an integer ({datatype})")
        info = np.iinfo(dtype)
        if values and (min(values) < info.min or max(values) > info.max):
            _first_bad(values, lambda v: info.min <= v <= info.max, where,
                       f"in {datatype}'s range {info.min}..{info.max}")
        return np.array(values, dtype=dtype)
    if dtype.kind == "f":
        _first_bad(values, lambda v: type(v) is float or type(v) is int, where, "a number")
        try:
            wide = np.array(values, dtype=np.float64)
        except OverflowError:  # an integer literal beyond any double
            _first_bad(values, lambda v: abs(v) < 2**1024, where, f"in {datatype}'s range")
            raise  # not reached: _first_bad raises
        with np.errstate(over="ignore"):  # overflow is checked just below, by value
            narrow = wide.astype(dtype)
        overflowed = np.flatnonzero(np.isinf(narrow) & np.isfinite(wide))
        if overflowed.size:
            i = int(overflowed[0])
            raise InvalidV2Request(
                f"{where} data element {i} ({values[i]!r}) is out of {datatype}'s range")
        return narrow
    # BYTES: JSON strings are text; the tensor holds their UTF-8 bytes.
    _first_bad(values, lambda v: type(v) is str, where, "a string")
    flat = np.empty(count, dtype=object)
    for i, text in enumerate(values):
        try:
            flat[i] = text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800"
            raise InvalidV2Request(
                f"{where} data element {i} is not valid Unicode (it has a lone surrogate)"
            ) from None
    return flat


def _flatten(data, where: str) -> list:
    """Nested arrays, level by level (no recursion), to their row-major leaves.

    Any nesting is accepted as long as it is rectangular: at each depth all items are arrays
    of one length, or none is an array. Ragged data has no row-major order, so it is an error.
    """
    if not isinstance(data, list):
        raise InvalidV2Request(f"{where} 'data' must be an array, got {_kind(data)}")
    level, depth = data, 0
    while level and isinstance(level[0], list):
        depth += 1
        width = len(level[0])
        for item in level:
            if not isinstance(item, list):
                raise InvalidV2Request(
                    f"{where} 'data' is ragged: at depth {depth} it mixes arrays and values")
            if len(item) != width:
                raise InvalidV2Request(
                    f"{where} 'data' is ragged: at depth {depth} it has arrays of lengths "
                    f"{width} and {len(item)}")
        level = [leaf for item in level for leaf in item]
    for item in level:
        if isinstance(item, list):
            raise InvalidV2Request(
                f"{where} 'data' is ragged: at depth {depth + 1} it mixes arrays and values")
    return level


def _from_binary(binary: _BinaryPart, size: int, datatype: str, count: int,
                 shape: list[int], where: str) -> np.ndarray:
    """`size` bytes of the binary part as a flat array of `count` elements."""
    dtype = DATATYPES[datatype]
    if datatype == "BYTES":
        return _bytes_elements(binary.take(size, where), count, where)
    if size != count * dtype.itemsize:
        raise InvalidV2Request(
            f"{where} has shape {_fmt(shape)} of {datatype}, which is "
            f"{count * dtype.itemsize} bytes, but its binary_data_size is {size}")
    raw = binary.take(size, where)
    if datatype == "BOOL":
        octets = np.frombuffer(raw, dtype=np.uint8)
        bad = np.flatnonzero(octets > 1)
        if bad.size:
            i = int(bad[0])
            raise InvalidV2Request(
                f"{where} BOOL element {i} is the byte {int(octets[i])}; must be 0 or 1")
        return octets.astype(np.bool_)
    # astype copies: the array owns its memory and does not pin the request body.
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype)


def _bytes_elements(raw: memoryview, count: int, where: str) -> np.ndarray:
    """BYTES binary data: `count` elements, each a 4-byte LE length then the bytes."""
    if 4 * count > len(raw):  # before allocating: every element needs its 4-byte prefix
        raise InvalidV2Request(
            f"{where} has {count} BYTES elements, which need at least {4 * count} bytes, but "
            f"its binary_data_size is {len(raw)}")
    flat = np.empty(count, dtype=object)
    pos = 0
    for i in range(count):
        if pos + 4 > len(raw):
            raise InvalidV2Request(
                f"{where} BYTES element {i}: its 4-byte length prefix is cut off at byte {pos} "
                f"of {len(raw)}")
        (length,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if length > len(raw) - pos:
            raise InvalidV2Request(
                f"{where} BYTES element {i}: its length prefix says {length} bytes but only "
                f"{len(raw) - pos} are left in its binary data")
        flat[i] = bytes(raw[pos:pos + length])
        pos += length
    if pos != len(raw):
        raise InvalidV2Request(
            f"{where} has {len(raw) - pos} bytes of binary data left over after its {count} "
            f"BYTES elements (binary_data_size {len(raw)})")
    return flat


def _requested_outputs(outputs_json) -> list[RequestedOutput] | None:
    # Absent or empty both mean all outputs, as in Triton.
    if outputs_json is None or outputs_json == []:
        return None
    if not isinstance(outputs_json, list):
        raise InvalidV2Request(
            f"'outputs' must be an array of requested outputs, got {_kind(outputs_json)}")
    outputs: list[RequestedOutput] = []
    seen: set[str] = set()
    for i, item in enumerate(outputs_json):
        where = f"outputs[{i}]"
        output = _object(item, where)
        _only_fields(output, where, ("name", "parameters"))
        name = _name(output, where)
        where = f"output {name!r}"
        if name in seen:
            raise InvalidV2Request(f"{where} is requested twice")
        seen.add(name)
        parameters = _parameters(output.get("parameters"), f"{where} 'parameters'")
        _refuse_unsupported(parameters, where)
        flag = parameters.get("binary_data")
        if flag is not None and not isinstance(flag, bool):
            raise InvalidV2Request(
                f"{where} parameters.binary_data must be true or false, got {_kind(flag)}")
        outputs.append(RequestedOutput(name=name, binary=flag))
    return outputs


def _sequence(parameters: dict) -> Sequence | None:
    flags = {}
    for key in ("sequence_start", "sequence_end"):
        flags[key] = parameters.get(key, False)
        if not isinstance(flags[key], bool):
            raise InvalidV2Request(
                f"parameters.{key} must be true or false, got {_kind(flags[key])}")
    if "sequence_id" not in parameters:
        for key, value in flags.items():
            if value:
                raise InvalidV2Request(f"parameters.{key} is true but there is no sequence_id")
        return None
    sequence_id = parameters["sequence_id"]
    if type(sequence_id) is int:
        if not 1 <= sequence_id <= _UINT64_MAX:
            raise InvalidV2Request(
                f"parameters.sequence_id {_short(sequence_id)} is out of range: it must be "
                f"1..{_UINT64_MAX} (omit it for a request outside a sequence)")
    elif isinstance(sequence_id, str):
        if not sequence_id:
            raise InvalidV2Request(
                "parameters.sequence_id is empty: it must be a non-empty string or an integer "
                "(omit it for a request outside a sequence)")
        _check_unicode(sequence_id, "parameters.sequence_id")
    else:
        raise InvalidV2Request(
            f"parameters.sequence_id must be an integer 1..{_UINT64_MAX} or a non-empty "
            f"string, got {_kind(sequence_id)}")
    return Sequence(id=sequence_id, start=flags["sequence_start"], end=flags["sequence_end"])


# --- checks against the model -----------------------------------------------------------------

def check_inputs(request: InferRequest, metas: list[TensorMeta], *,
                 optional: frozenset[str] = frozenset()) -> None:
    """Check the request's inputs against what the model declares; raise InvalidV2Request."""
    declared = {meta.name: meta for meta in metas}
    for name, array in request.inputs.items():
        meta = declared.get(name)
        if meta is None:
            raise InvalidV2Request(
                f"unknown input {name!r}; the model's inputs are "
                + (", ".join(repr(m.name) for m in metas) or "none"))
        datatype = v2_datatype(array.dtype)
        if datatype != meta.datatype:
            raise InvalidV2Request(
                f"input {name!r} must be {meta.datatype}, got {datatype}")
        fits = len(array.shape) == len(meta.shape) and all(
            want == -1 or want == got for want, got in zip(meta.shape, array.shape, strict=True))
        if not fits:
            raise InvalidV2Request(
                f"input {name!r} must have shape {_fmt(meta.shape)} (-1: any size), "
                f"got {_fmt(array.shape)}")
    for meta in metas:
        if meta.name not in request.inputs and meta.name not in optional:
            raise InvalidV2Request(
                f"missing input {meta.name!r} ({meta.datatype}, shape {_fmt(meta.shape)})")


def resolve_binary(request: InferRequest, output_names: list[str]) -> dict[str, bool]:
    """Which outputs to return, each mapped to whether it goes binary.

    `output_names` are the model's outputs. The per-output binary_data wins, then the
    request's binary_data_output, then JSON. The dict is in the order to return them.
    """
    if request.outputs is None:
        return {name: request.binary_output_default for name in output_names}
    known = set(output_names)
    for output in request.outputs:
        if output.name not in known:
            raise InvalidV2Request(
                f"unknown output {output.name!r}; the model's outputs are "
                + (", ".join(repr(name) for name in output_names) or "none"))
    return {
        output.name: request.binary_output_default if output.binary is None else output.binary
        for output in request.outputs
    }


# --- responses ------------------------------------------------------------------------------

def encode_infer_response(*, model_name: str, model_version: str, request_id: str | None,
                          outputs: list[tuple[TensorMeta, np.ndarray]],
                          binary: dict[str, bool]) -> tuple[bytes, dict[str, str]]:
    """The response body and the headers that go with it.

    `binary` maps an output's name to whether it goes binary (see resolve_binary); a name
    missing from it goes as JSON. Binary outputs' bytes follow the JSON in output order, as
    tritonclient reads them.
    Raises InvalidV2Request only when the client asked for JSON of something JSON cannot
    carry (BYTES that are not UTF-8); a tensor that does not match its TensorMeta is a
    server bug (ValueError).
    """
    entries, chunks, any_binary = [], [], False
    for meta, array in outputs:
        array = np.asarray(array)
        if meta.datatype not in DATATYPES or v2_datatype(array.dtype) != meta.datatype:
            raise ValueError(
                f"output {meta.name!r} is declared {meta.datatype} but the array is {array.dtype}")
        entry = {"name": meta.name, "datatype": meta.datatype,
                 "shape": [int(d) for d in array.shape]}
        if binary.get(meta.name, False):
            any_binary = True
            raw = _to_binary(array, meta.datatype, meta.name)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = _to_json(array, meta)
        entries.append(entry)
    response: dict = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        response["id"] = request_id
    response["outputs"] = entries
    # allow_nan writes NaN / Infinity / -Infinity, as Triton does (see the module docstring).
    # float32 and float16 become Python floats exactly, and repr of a float round-trips.
    header = json.dumps(response, separators=(",", ":"), allow_nan=True).encode("ascii")
    if not any_binary:
        return header, {"Content-Type": "application/json"}
    return b"".join([header, *chunks]), {
        "Content-Type": "application/octet-stream",
        HEADER_LENGTH: str(len(header)),
    }


def _to_json(array: np.ndarray, meta: TensorMeta) -> list:
    flat = array.ravel(order="C")
    if meta.datatype != "BYTES":
        return flat.tolist()
    texts = []
    for i, element in enumerate(flat):
        raw = _element_bytes(element, meta.name)
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidV2Request(
                f"output {meta.name!r} element {i} is not UTF-8 text, so it cannot be sent as "
                f"JSON; request the output with parameters.binary_data true") from None
    return texts


def _to_binary(array: np.ndarray, datatype: str, name: str) -> bytes:
    if datatype != "BYTES":
        return np.ascontiguousarray(array, dtype=DATATYPES[datatype].newbyteorder("<")).tobytes()
    parts = []
    for element in array.ravel(order="C"):
        raw = _element_bytes(element, name)
        parts += (struct.pack("<I", len(raw)), raw)
    return b"".join(parts)


def _element_bytes(element, name: str) -> bytes:
    if isinstance(element, bytes | bytearray | memoryview):
        return bytes(element)
    if isinstance(element, str):
        return element.encode("utf-8")
    raise ValueError(f"BYTES output {name!r} holds a {type(element).__name__}, not bytes")


def encode_error(message: str) -> bytes:
    """The v2 error body, {"error": message}: what tritonclient shows as the message."""
    return json.dumps({"error": message}).encode("ascii")


# --- helpers --------------------------------------------------------------------------------

def _load_json(raw: memoryview, *, has_header: bool):
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidV2Request(
            f"the request's JSON is not valid UTF-8 (at byte {e.start})") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_float=_finite_float)
    except json.JSONDecodeError as e:
        if not raw.nbytes:
            hint = f" (an empty JSON part: check {HEADER_LENGTH})"
        elif e.msg == "Extra data" and not has_header:  # likely binary data, header forgotten
            hint = f"; binary tensor data after the JSON needs the {HEADER_LENGTH} header"
        else:
            hint = ""
        raise InvalidV2Request(
            f"the request is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}{hint}"
        ) from None
    except ValueError as e:  # the int digit limit (4300): str(e) says so
        raise InvalidV2Request(f"the request's JSON has a number that is too long: {e}") from None
    except RecursionError:
        raise InvalidV2Request("the request's JSON is nested too deeply") from None


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    # json keeps the last of two equal keys; two parsers may disagree on which one counts.
    result = dict(pairs)
    if len(result) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise InvalidV2Request(f"the request's JSON has the key {key!r} twice in one "
                                       "object")
            seen.add(key)
    return result


def _finite_float(text: str) -> float:
    # A literal such as 1e400 would become inf silently; NaN and Infinity are spelled out.
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise InvalidV2Request(f"the number {text[:40]} in the request is too large")
    return value


def _object(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise InvalidV2Request(f"{where} must be a JSON object, got {_kind(value)}")
    return value


def _only_fields(obj: dict, where: str, allowed: tuple[str, ...]) -> None:
    for key in obj:
        if key not in allowed:
            raise InvalidV2Request(
                f"{where} has an unknown field {key[:60]!r}; the fields are "
                + ", ".join(allowed))


def _name(obj: dict, where: str) -> str:
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidV2Request(f"{where} must have a 'name' that is a non-empty string"
                               + ("" if name is None else f", got {_kind(name)}"))
    _check_unicode(name, f"{where} 'name'")
    return name


def _check_unicode(text: str | None, where: str) -> None:
    # JSON's \ud800 escapes give strings that cannot be encoded; refused here so that no
    # later step (a log line, an error body written as UTF-8) trips over them.
    if text is not None:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidV2Request(f"{where} is not valid Unicode (a lone surrogate)") from None


def _parameters(value, where: str) -> dict:
    return {} if value is None else _object(value, where)


def _refuse_unsupported(parameters: dict, where: str) -> None:
    for key in _UNSUPPORTED_TENSOR_PARAMETERS:
        if key in parameters:
            raise InvalidV2Request(f"{where} asks for {key!r}, which this server does not "
                                   "support; send the tensor's data in the body")


def _shape(value, where: str) -> list[int]:
    if not isinstance(value, list) or not all(type(d) is int for d in value):
        raise InvalidV2Request(
            f"{where} 'shape' must be an array of non-negative integers, got {_short(value)}")
    if len(value) > MAX_RANK:
        raise InvalidV2Request(f"{where} has {len(value)} dimensions; at most {MAX_RANK}")
    for d in value:
        if not 0 <= d <= _MAX_DIM:
            raise InvalidV2Request(
                f"{where} 'shape' {_fmt(value)} has the dimension {_short(d)}; dimensions are "
                f"0..{_MAX_DIM}")
    return value


def _element_count(shape: list[int], dtype: np.dtype, where: str) -> int:
    """The element count, as a Python int: nothing is allocated from it.

    numpy refuses any shape whose non-zero dimensions multiply past its address space, even
    if a zero makes the tensor empty, so such a shape is refused here instead.
    """
    count, nonzero = 1, 1
    for d in shape:
        count *= d
        nonzero *= d or 1
    if nonzero * dtype.itemsize > _MAX_DIM:
        raise InvalidV2Request(f"{where} has shape {_fmt(shape)}, more than any tensor can hold")
    return count


def _first_bad(values: list, ok, where: str, expected: str) -> None:
    for i, value in enumerate(values):
        if not ok(value):
            raise InvalidV2Request(
                f"{where} data element {i} must be {expected}, got {_short(value)}")


def _kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return f"the number {_short(value)}"
    if isinstance(value, str):
        return f"the string {_short(value)}"
    return "an array" if isinstance(value, list) else "an object"


def _short(value) -> str:
    """A value for a message, cut short: client data can be any size or depth."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, str):
        return json.dumps(value[:40]) + ("..." if len(value) > 40 else "")
    if isinstance(value, int | float):
        text = repr(value)
        return text if len(text) <= 40 else text[:37] + "..."
    if isinstance(value, dict):
        return "an object"
    if len(value) <= 8 and not any(isinstance(v, list | dict) for v in value):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return f"an array of {len(value)} items"


def _fmt(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"
