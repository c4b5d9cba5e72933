"""The v2 codec against the real client: requests built by tritonclient's own serialiser
(`InferenceServerClient.generate_request_body`) parse to the tensors that went in, and
responses the codec encodes read back through tritonclient's own parser
(`InferResult.from_response_body`) as the tensors that went out. Then a table of bad requests,
each a 400 naming its problem, and the checks against a model's declared inputs and outputs.
"""

from __future__ import annotations

import ast
import json
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from carousel.service import v2codec
from carousel.service.errors import InvalidInput, error_body
from carousel.service.v2codec import (
    DATATYPES,
    InferRequest,
    InvalidV2Request,
    RequestedOutput,
    Sequence,
    TensorMeta,
    check_inputs,
    encode_error,
    encode_infer_response,
    parse_infer_request,
    resolve_binary,
    v2_datatype,
)
from tritonclient.http._utils import _get_error

HEADER = "Inference-Header-Content-Length"

# Values at the edges of each datatype, two rows each so nesting and reshape are exercised.
SAMPLES = {
    "BOOL": [[True, False, True], [False, False, True]],
    "UINT8": [[0, 1, 255], [7, 128, 254]],
    "UINT16": [[0, 1, 65535], [7, 32768, 65534]],
    "UINT32": [[0, 1, 2**32 - 1], [7, 2**31, 2**32 - 2]],
    "UINT64": [[0, 1, 2**64 - 1], [7, 2**63, 2**53 + 1]],
    "INT8": [[-128, 0, 127], [-1, 1, 2]],
    "INT16": [[-(2**15), 0, 2**15 - 1], [-1, 1, 2]],
    "INT32": [[-(2**31), 0, 2**31 - 1], [-1, 1, 2]],
    "INT64": [[-(2**63), 0, 2**63 - 1], [-1, 2**53 + 1, -(2**53) - 1]],
    "FP16": [[0.0, -0.0, 65504.0], [6e-8, 1 / 3, -2.5]],
    "FP32": [[0.0, -0.0, 3.4028235e38], [1e-45, 1 / 3, -1.1754944e-38]],
    "FP64": [[0.0, -0.0, 1.7976931348623157e308], [5e-324, 1 / 3, -2.2250738585072014e-308]],
    "BYTES": [[b"", b"a", "\u00fc\u20ac".encode()], [b"x" * 300, b"\x00\x01", b"end"]],
}
NOT_UTF8 = np.array([b"\xff\xfe", b"ok", b"\x80"], dtype=object)


def sample(datatype: str) -> np.ndarray:
    return np.array(SAMPLES[datatype], dtype=DATATYPES[datatype])


def client_input(name: str, array: np.ndarray, *, binary: bool) -> triton.InferInput:
    tensor = triton.InferInput(name, list(array.shape), v2_datatype(array.dtype))
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def client_request(inputs: list[triton.InferInput], **kwargs) -> InferRequest:
    """Serialise with tritonclient, parse with the codec."""
    body, header_length = triton.InferenceServerClient.generate_request_body(inputs, **kwargs)
    return parse_infer_request(body, header_length)


def client_reads(body: bytes, headers: dict[str, str]) -> triton.InferResult:
    length = headers.get(HEADER)
    return triton.InferenceServerClient.parse_response_body(
        body, header_length=None if length is None else int(length))


def assert_same(got: np.ndarray, want: np.ndarray, *, exact_bits: bool = True) -> None:
    """Same dtype, shape and values; floats bit for bit (or, through JSON, up to NaN payload)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    if want.dtype.kind == "f":
        assert np.array_equal(got, want, equal_nan=True)
        if exact_bits:
            assert got.tobytes() == want.tobytes()
        else:  # JSON has one NaN; everything else, -0.0 included, keeps its sign
            numbers = ~np.isnan(want)
            assert (np.signbit(got) == np.signbit(want))[numbers].all()
    elif want.dtype.kind == "O":
        assert got.tolist() == want.tolist()
        assert all(type(x) is bytes for x in got.ravel())
    else:
        assert np.array_equal(got, want)


# --- requests from tritonclient -------------------------------------------------------------

@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", list(DATATYPES))
def test_a_tritonclient_request_parses_to_the_tensor_it_was_built_from(datatype, binary):
    array = sample(datatype)
    request = client_request([client_input("x", array, binary=binary)])
    assert list(request.inputs) == ["x"]
    assert_same(request.inputs["x"], array, exact_bits=binary)


def test_inputs_mixing_binary_and_json_keep_their_order_and_the_request_fields():
    arrays = {"c": sample("FP32"), "a": sample("BYTES"), "b": sample("INT8").ravel(),
              "d": sample("BOOL")[:, :1], "e": np.zeros((0, 3), np.float64)}
    inputs = [client_input(name, array, binary=name in "ce")
              for name, array in arrays.items()]
    request = client_request(inputs, request_id="req-7", priority=3, timeout=500,
                             parameters={"temperature": 0.5, "tag": "x"},
                             outputs=[triton.InferRequestedOutput("y")])
    assert list(request.inputs) == list(arrays)
    for name, array in arrays.items():
        assert_same(request.inputs[name], array, exact_bits=name in "ce")
    assert request.id == "req-7"
    assert request.parameters == {"priority": 3, "timeout": 500, "temperature": 0.5, "tag": "x"}
    assert request.sequence is None and request.binary_output_default is False


@pytest.mark.parametrize("sequence_id", [1, 42, 2**64 - 1, "abc", "s\u00e9q-\u4e00"])
@pytest.mark.parametrize("start, end", [(False, False), (True, False), (False, True),
                                        (True, True)])
def test_sequence_parameters_from_tritonclient(sequence_id, start, end):
    request = client_request([client_input("x", sample("FP32"), binary=True)],
                             sequence_id=sequence_id, sequence_start=start, sequence_end=end,
                             parameters={"keep": 1})
    assert request.sequence == Sequence(id=sequence_id, start=start, end=end)
    assert type(request.sequence.id) is type(sequence_id)
    # sequence_* are in request.sequence, not in parameters; the rest passes through
    assert request.parameters == {"keep": 1, "binary_data_output": True}


def test_no_sequence_id_is_no_sequence():
    request = client_request([client_input("x", sample("FP32"), binary=True)])
    assert request.sequence is None and "sequence_id" not in request.parameters


@pytest.mark.parametrize("asked, expected", [
    (None, {"y": True, "z": True}),  # tritonclient then sets binary_data_output true
    ([("y", True)], {"y": True}),
    ([("z", False), ("y", True)], {"z": False, "y": True}),
])
def test_requested_outputs_from_tritonclient_resolve_to_binary_or_json(asked, expected):
    outputs = None if asked is None else [triton.InferRequestedOutput(name, binary_data=flag)
                                          for name, flag in asked]
    request = client_request([client_input("x", sample("FP32"), binary=True)], outputs=outputs)
    if asked is None:
        assert request.outputs is None and request.binary_output_default is True
    else:
        assert request.outputs == [RequestedOutput(name, flag) for name, flag in asked]
    assert resolve_binary(request, ["y", "z"]) == expected
    assert list(resolve_binary(request, ["y", "z"])) == list(expected)  # the order to return


def handmade(doc: dict) -> InferRequest:
    return parse_infer_request(json.dumps(doc).encode(), None)


X = {"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}


@pytest.mark.parametrize("request_binary, output_binary, expected", [
    (None, None, False), (True, None, True), (False, True, True), (True, False, False),
])
def test_a_per_output_flag_wins_over_the_request_default(request_binary, output_binary,
                                                         expected):
    doc: dict = {"inputs": [X], "outputs": [{"name": "y"}]}
    if request_binary is not None:
        doc["parameters"] = {"binary_data_output": request_binary}
    if output_binary is not None:
        doc["outputs"][0]["parameters"] = {"binary_data": output_binary}
    assert resolve_binary(handmade(doc), ["y", "z"]) == {"y": expected}


def test_nested_and_flat_json_data_are_the_same_tensor():
    flat = handmade({"inputs": [{**X, "shape": [2, 2], "data": [1, 2, 3, 4]}]})
    nested = handmade({"inputs": [{**X, "shape": [2, 2], "data": [[1, 2], [3, 4]]}]})
    assert_same(nested.inputs["x"], np.array([[1, 2], [3, 4]], np.float32))
    assert_same(flat.inputs["x"], nested.inputs["x"])


def test_nan_and_infinity_from_a_tritonclient_json_request():
    array = np.array([np.nan, np.inf, -np.inf, 1.5], dtype=np.float32)
    request = client_request([client_input("x", array, binary=False)])
    assert_same(request.inputs["x"], array, exact_bits=False)


def test_an_empty_outputs_list_means_all_outputs_and_null_means_absent():
    request = handmade({"id": None, "parameters": None, "inputs": [X], "outputs": []})
    assert request.outputs is None and request.id is None and request.parameters == {}


def test_a_huge_declared_shape_is_refused_without_allocating():
    docs = [
        ({"inputs": [{**X, "shape": [2**40], "data": [1.0]}]}, b""),
        ({"inputs": [{"name": "x", "shape": [2**40], "datatype": "FP32",
                      "parameters": {"binary_data_size": 4}}]}, b"\0" * 4),
        ({"inputs": [{"name": "x", "shape": [2**20, 2**20], "datatype": "BYTES",
                      "parameters": {"binary_data_size": 4}}]}, b"\0" * 4),
        ({"inputs": [{**X, "shape": [0, 2**62], "data": []}]}, b""),
    ]
    tracemalloc.start()
    try:
        for doc, tail in docs:
            header = json.dumps(doc).encode()
            with pytest.raises(InvalidV2Request):
                parse_infer_request(header + tail, len(header) if tail else None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


# --- responses read by tritonclient ---------------------------------------------------------

@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", list(DATATYPES))
def test_tritonclient_reads_an_encoded_response_as_the_tensor(datatype, binary):
    array = sample(datatype)
    body, headers = encode_infer_response(
        model_name="m", model_version="3", request_id="r1",
        outputs=[(TensorMeta("y", datatype, (-1, 3)), array)], binary={"y": binary})
    result = client_reads(body, headers)
    got = result.as_numpy("y")
    if datatype == "BYTES" and not binary:  # tritonclient reads JSON strings as str
        assert got.tolist() == [[x.decode() for x in row] for row in SAMPLES["BYTES"]]
    else:
        assert_same(got, array, exact_bits=binary)
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == ("m", "3", "r1")
    if binary:
        assert headers["Content-Type"] == "application/octet-stream"
        assert json.loads(body[:int(headers[HEADER])]) == response
    else:
        assert headers == {"Content-Type": "application/json"} and json.loads(body) == response


def test_several_outputs_binary_and_json_interleaved():
    outputs = [
        (TensorMeta("a", "FP32", (-1, 3)), sample("FP32")),
        (TensorMeta("b", "BYTES", (-1,)), NOT_UTF8),
        (TensorMeta("c", "INT64", (2, 3)), sample("INT64")),
        (TensorMeta("d", "FP64", (0,)), np.zeros(0)),  # an empty binary output
        (TensorMeta("e", "INT16", (3, 2)), sample("INT16").T),  # not C-contiguous
        (TensorMeta("f", "FP32", (3,)), np.array([1.5, -2, 3], dtype=">f4")),  # big-endian
    ]
    binary = {"a": True, "b": True, "c": False, "d": True, "e": True, "f": True}
    body, headers = encode_infer_response(model_name="m", model_version="1", request_id=None,
                                          outputs=outputs, binary=binary)
    result = client_reads(body, headers)
    assert [o["name"] for o in result.get_response()["outputs"]] == list("abcdef")
    assert "id" not in result.get_response()
    for meta, array in outputs:
        want = array.astype(array.dtype.newbyteorder("=")) if array.dtype.kind != "O" else array
        assert_same(result.as_numpy(meta.name), want)


def test_nan_and_infinity_in_json_are_written_as_triton_writes_them():
    array = np.array([np.nan, np.inf, -np.inf, -0.0], dtype=np.float32)
    body, headers = encode_infer_response(model_name="m", model_version="1", request_id=None,
                                          outputs=[(TensorMeta("y", "FP32", (4,)), array)],
                                          binary={"y": False})
    assert b'"data":[NaN,Infinity,-Infinity,-0.0]' in body
    assert_same(client_reads(body, headers).as_numpy("y"), array, exact_bits=False)


def test_bytes_that_are_not_utf8_cannot_go_in_json_but_can_go_binary():
    meta = TensorMeta("y", "BYTES", (-1,))
    with pytest.raises(InvalidV2Request, match="'y' element 0 is not UTF-8.*binary_data true"):
        encode_infer_response(model_name="m", model_version="1", request_id=None,
                              outputs=[(meta, NOT_UTF8)], binary={"y": False})
    body, headers = encode_infer_response(model_name="m", model_version="1", request_id=None,
                                          outputs=[(meta, NOT_UTF8)], binary={"y": True})
    assert_same(client_reads(body, headers).as_numpy("y"), NOT_UTF8)


def test_an_output_whose_array_does_not_match_its_declaration_is_a_server_bug():
    with pytest.raises(ValueError, match="declared FP32"):
        encode_infer_response(model_name="m", model_version="1", request_id=None,
                              outputs=[(TensorMeta("y", "FP32", (3,)), np.zeros(3))],
                              binary={})


@pytest.mark.parametrize("message", ["input 'x' must be FP32, got INT64", 'quote " \u00e9'])
def test_tritonclient_shows_the_error_body_message(message):
    class Response:  # what tritonclient's _get_error reads from an HTTP response
        status_code = 400

        def read(self):
            return encode_error(message)

    error = _get_error(Response())
    assert error.message() == message and error.status() == "400"
    assert json.loads(encode_error(message)) == {"error": message}


def test_invalid_v2_request_is_a_400_invalid_input():
    error = InvalidV2Request("nope")
    assert isinstance(error, InvalidInput) and error.status == 400
    assert error_body(error) == {"error": {"code": "invalid_v2_request", "message": "nope"}}


def test_v2_datatype_is_the_inverse_of_the_table():
    assert {v2_datatype(dtype): dtype for dtype in DATATYPES.values()} == DATATYPES
    assert v2_datatype(np.dtype(">i4")) == "INT32"
    with pytest.raises(ValueError, match="complex128"):
        v2_datatype(np.complex128)


def test_the_codec_imports_only_numpy_and_the_service_errors():
    tree = ast.parse(Path(v2codec.__file__).read_text())
    imported = {(node.module or "") if isinstance(node, ast.ImportFrom) else alias.name
                for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)
                for alias in node.names}
    assert imported == {"__future__", "json", "re", "struct", "dataclasses", "numpy", "errors"}


# --- bad requests ---------------------------------------------------------------------------

def body_of(doc) -> bytes:
    return json.dumps(doc).encode()


def with_input(**fields) -> bytes:
    return body_of({"inputs": [{**X, **fields}]})


def with_parameters(**parameters) -> bytes:
    return body_of({"inputs": [X], "parameters": parameters})


def binary_input(datatype: str, shape: list[int], raw: bytes,
                 size: int | float | None = None) -> tuple[bytes, int]:
    header = body_of({"inputs": [{"name": "x", "shape": shape, "datatype": datatype,
                                  "parameters": {"binary_data_size": len(raw) if size is None
                                                 else size}}]})
    return header + raw, len(header)


def prefixed(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


BAD = {
    # the JSON itself
    "not JSON": (b"{nope", None, "not valid JSON"),
    "empty body": (b"", None, "not valid JSON"),
    "invalid UTF-8": (b'{"id": "\xff", "inputs": []}', None, "not valid UTF-8 (at byte 8)"),
    "an array": (b"[1, 2]", None, "the request must be a JSON object, got an array"),
    "a string": (b'"hi"', None, "must be a JSON object, got the string"),
    "null": (b"null", None, "must be a JSON object, got null"),
    "too deep": (b"[" * 100_000, None, "nested too deeply"),
    "duplicate key": (b'{"inputs": [], "inputs": []}', None, "key 'inputs' twice"),
    "huge literal": (with_input(data=[7.5]).replace(b"7.5", b"1e400"), None,
                     "number 1e400 in the request is too large"),
    "5000 digits": (with_input(datatype="INT64", data=[7]).replace(b"[7]", b"[%s]" % (b"9" * 5000)),
                    None, "number that is too long"),
    # the request object
    "unknown field": (body_of({"inputs": [X], "input": []}), None, "unknown field 'input'"),
    "no inputs": (body_of({"id": "a"}), None, "'inputs' must be an array"),
    "inputs not an array": (body_of({"inputs": {}}), None, "got an object"),
    "id not a string": (body_of({"id": 5, "inputs": [X]}), None, "'id' must be a string"),
    "id lone surrogate": (b'{"id": "\\ud800", "inputs": []}', None, "'id' is not valid Unicode"),
    "input not an object": (body_of({"inputs": [5]}), None, "inputs[0] must be a JSON object"),
    "unknown input field": (with_input(dims=[1]), None, "unknown field 'dims'"),
    "no name": (body_of({"inputs": [{"shape": [1], "datatype": "FP32", "data": [1]}]}), None,
                "'name' that is a non-empty string"),
    "empty name": (with_input(name=""), None, "'name' that is a non-empty string"),
    "name lone surrogate": (b'{"inputs": [{"name": "\\udfff"}]}', None, "lone surrogate"),
    "duplicate input": (body_of({"inputs": [X, X]}), None, "input 'x' is given twice"),
    # datatypes and shapes
    "unknown datatype": (with_input(datatype="FLOAT32"), None, 'datatype "FLOAT32"'),
    "BF16": (with_input(datatype="BF16"), None, 'datatype "BF16"; the datatypes are BOOL'),
    "datatype a list": (with_input(datatype=["FP32"]), None, 'datatype ["FP32"]'),
    "negative dim": (with_input(shape=[2, -1]), None, "has the dimension -1"),
    "float dim": (with_input(shape=[1.0]), None, "'shape' must be an array of non-negative"),
    "bool dim": (with_input(shape=[True]), None, "'shape' must be an array of non-negative"),
    "shape a string": (with_input(shape="1"), None, "'shape' must be an array"),
    "dim past int64": (with_input(shape=[2**63], data=[]), None, "has the dimension"),
    "rank 33": (with_input(shape=[1] * 33), None, "33 dimensions; at most 32"),
    "huge shape": (with_input(shape=[2**40]), None,
                   "shape [1099511627776] (1099511627776 elements) but its data has 1"),
    "huge empty shape": (with_input(shape=[0, 2**62], data=[]), None, "more than any tensor"),
    # JSON data
    "count short": (with_input(shape=[2, 2], data=[1, 2, 3]), None,
                    "shape [2, 2] (4 elements) but its data has 3 elements"),
    "count long": (with_input(shape=[1], data=[1, 2]), None, "(1 elements) but its data has 2"),
    "ragged lengths": (with_input(shape=[2, 2], data=[[1, 2], [3]]), None,
                       "ragged: at depth 1 it has arrays of lengths 2 and 1"),
    "ragged mixed": (with_input(shape=[2, 2], data=[[1, 2], 3]), None,
                     "ragged: at depth 1 it mixes arrays and values"),
    "ragged mixed first": (with_input(shape=[2], data=[1, [2]]), None, "mixes arrays and values"),
    "data not an array": (with_input(data=1.0), None, "'data' must be an array, got the number"),
    "INT8 300": (with_input(datatype="INT8", data=[300]), None,
                 "element 0 must be in INT8's range -128..127, got 300"),
    "UINT64 overflow": (with_input(datatype="UINT64", data=[2**64]), None, "UINT64's range"),
    "UINT8 negative": (with_input(datatype="UINT8", data=[-1]), None, "UINT8's range"),
    "float for INT": (with_input(datatype="INT32", data=[1.0]), None,
                      "must be an integer (INT32), got 1.0"),
    "true for INT": (with_input(datatype="INT64", data=[True]), None, "integer (INT64), got true"),
    "NaN for INT": (with_input(datatype="INT64", data=[float("nan")]), None, "got nan"),
    "1 for BOOL": (with_input(datatype="BOOL", data=[1]), None, "true or false, got 1"),
    "string for FP32": (with_input(data=["1.0"]), None, 'must be a number, got "1.0"'),
    "bool for FP32": (with_input(data=[False]), None, "must be a number, got false"),
    "FP32 overflow": (with_input(data=[1e39]), None, "element 0 (1e+39) is out of FP32's range"),
    "FP16 overflow": (with_input(datatype="FP16", data=[70000]), None, "out of FP16's range"),
    "int past double": (with_input(datatype="FP64", data=[10**400]), None, "FP64's range"),
    "number for BYTES": (with_input(datatype="BYTES", data=[1]), None, "must be a string, got 1"),
    "BYTES lone surrogate": (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", '
                             b'"data": ["\\ud800"]}]}', None, "lone surrogate"),
    # binary data
    "data and binary": (with_input(parameters={"binary_data_size": 4}), None, "got both"),
    "neither": (body_of({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]}), None,
                "exactly one of 'data' and parameters.binary_data_size, got neither"),
    "binary, no header": (binary_input("FP32", [1], b"", size=4)[0], None,
                          "no Inference-Header-Content-Length header"),
    "binary bytes, no header": (binary_input("FP32", [1], b"\0" * 4)[0], None,
                                "Extra data at line 1 column 101; binary tensor data after the "
                                "JSON needs the Inference-Header-Content-Length header"),
    "binary size past the body": (*binary_input("FP32", [2], b"\0" * 4, size=8),
                                  "binary_data_size 8 but only 4 bytes of binary data are left"),
    "binary size not the shape": (*binary_input("FP32", [2], b"\0" * 4),
                                  "which is 8 bytes, but its binary_data_size is 4"),
    "bytes left over": (*binary_input("FP32", [1], b"\0" * 6, size=4),
                        "2 bytes after the JSON header that no input"),
    "binary size negative": (*binary_input("FP32", [1], b"", size=-4), "must be a byte count"),
    "binary size a float": (*binary_input("FP32", [1], b"", size=4.0), "got 4.0"),
    "BOOL byte 2": (*binary_input("BOOL", [3], b"\x01\x00\x02"), "element 2 is the byte 2"),
    "BYTES prefix too long": (*binary_input("BYTES", [1], struct.pack("<I", 100) + b"abc"),
                              "length prefix says 100 bytes but only 3 are left"),
    "BYTES prefix cut off": (*binary_input("BYTES", [2], prefixed(b"abcd") + b"\0\0"),
                             "element 1: its 4-byte length prefix is cut off at byte 8"),
    "BYTES left over": (*binary_input("BYTES", [1], prefixed(b"a", b"b")),
                        "5 bytes of binary data left over after its 1 BYTES elements"),
    "BYTES too few bytes": (*binary_input("BYTES", [3], prefixed(b"a")), "need at least 12"),
    # the header length
    "header past the body": (b'{"inputs": []}', 99, "is 99, past the end of the 14-byte body"),
    "header negative": (b'{"inputs": []}', -1, "must not be negative"),
    "header not digits": (b'{"inputs": []}', "1e3", "digits only"),
    "header zero": (b'{"inputs": []}', 0, "empty JSON part"),
    "header cuts the JSON": (b'{"inputs": []}', 5, "not valid JSON"),
    # parameters and sequences
    "parameters not an object": (body_of({"inputs": [X], "parameters": [1]}), None,
                                 "'parameters' must be a JSON object"),
    "parameter lone surrogate": (b'{"inputs": [], "parameters": {"k": "\\udc80"}}', None,
                                 "parameter 'k' is not valid Unicode"),
    "parameter a list": (with_parameters(tags=["a"]), None,
                         "parameter 'tags' must be a string, number or boolean"),
    "binary_data_output not bool": (with_parameters(binary_data_output=1), None,
                                    "binary_data_output must be true or false, got the number 1"),
    "sequence_id 0": (with_parameters(sequence_id=0), None, "sequence_id 0 is out of range"),
    "sequence_id empty": (with_parameters(sequence_id=""), None, "sequence_id is empty"),
    "sequence_id negative": (with_parameters(sequence_id=-1), None, "-1 is out of range"),
    "sequence_id overflow": (with_parameters(sequence_id=2**64), None,
                             "sequence_id 18446744073709551616 is out of range"),
    "sequence_id bool": (with_parameters(sequence_id=True), None, "got true/false"),
    "sequence_id float": (with_parameters(sequence_id=1.0), None, "got the number 1.0"),
    "sequence_id null": (with_parameters(sequence_id=None), None, "got null"),
    "sequence_start string": (with_parameters(sequence_id=1, sequence_start="yes"), None,
                              'sequence_start must be true or false, got the string "yes"'),
    "sequence_end number": (with_parameters(sequence_id=1, sequence_end=1), None,
                            "sequence_end must be true or false"),
    "start without id": (with_parameters(sequence_start=True), None,
                         "sequence_start is true but there is no sequence_id"),
    # requested outputs and what this server does not support
    "outputs not an array": (body_of({"inputs": [X], "outputs": {"name": "y"}}), None,
                             "'outputs' must be an array"),
    "output unknown field": (body_of({"inputs": [X], "outputs": [{"name": "y", "x": 1}]}), None,
                             "outputs[0] has an unknown field 'x'"),
    "output twice": (body_of({"inputs": [X], "outputs": [{"name": "y"}, {"name": "y"}]}), None,
                     "output 'y' is requested twice"),
    "binary_data not bool": (body_of({"inputs": [X], "outputs": [
        {"name": "y", "parameters": {"binary_data": "true"}}]}), None,
        "parameters.binary_data must be true or false"),
    "classification": (body_of({"inputs": [X], "outputs": [
        {"name": "y", "parameters": {"classification": 3}}]}), None,
        "output 'y' asks for 'classification', which this server does not support"),
    "shared memory": (with_input(parameters={"shared_memory_region": "r"}), None,
                      "input 'x' asks for 'shared_memory_region'"),
}


@pytest.mark.parametrize("body, header_length, words", BAD.values(), ids=BAD.keys())
def test_a_bad_request_is_a_400_that_names_the_problem(body, header_length, words):
    with pytest.raises(InvalidV2Request) as e:
        parse_infer_request(body, header_length)
    assert type(e.value) is InvalidV2Request and e.value.status == 400
    assert words in e.value.message
    json.loads(encode_error(e.value.message))  # every message can be sent


def test_the_bad_table_starts_from_good_requests():
    """Each bad body differs from a good one only in its fault: the good ones parse."""
    assert handmade({"inputs": [X]}).inputs["x"].tolist() == [1.0]
    for datatype, shape, raw in [("FP32", [1], b"\0" * 4), ("BOOL", [3], b"\1\0\1"),
                                 ("BYTES", [2], prefixed(b"ab", b""))]:
        parse_infer_request(*binary_input(datatype, shape, raw))
    assert handmade({"inputs": [X], "parameters": {"sequence_id": 1, "sequence_start": True}}
                    ).sequence == Sequence(1, True, False)
    assert parse_infer_request(b'{"inputs": []}', "14").inputs == {}
    empty = binary_input("FP32", [0, 3], b"")[0]  # no bytes to find: no header needed
    assert parse_infer_request(empty, None).inputs["x"].shape == (0, 3)


# --- checks against the model ---------------------------------------------------------------

METAS = [TensorMeta("tokens", "INT64", (-1, -1)), TensorMeta("state", "FP32", (2, -1, 8)),
         TensorMeta("reset", "BOOL", (1,))]


def request_with(**arrays) -> InferRequest:
    return InferRequest(id=None, inputs=arrays, outputs=None, binary_output_default=False,
                        parameters={}, sequence=None)


GOOD = {"tokens": np.zeros((1, 5), np.int64), "state": np.zeros((2, 3, 8), np.float32),
        "reset": np.array([True])}


def test_inputs_that_fit_the_model_pass():
    check_inputs(request_with(**GOOD), METAS)
    check_inputs(request_with(tokens=GOOD["tokens"]), METAS,
                 optional=frozenset({"state", "reset"}))


@pytest.mark.parametrize("change, words", [
    ({"extra": np.zeros(1)}, "unknown input 'extra'; the model's inputs are 'tokens', 'state'"),
    ({"tokens": np.zeros((1, 5), np.int32)}, "input 'tokens' must be INT64, got INT32"),
    ({"tokens": np.zeros(5, np.int64)},
     "input 'tokens' must have shape [-1, -1] (-1: any size), got [5]"),
    ({"state": np.zeros((3, 3, 8), np.float32)}, "'state' must have shape [2, -1, 8]"),
    ({"state": np.zeros((2, 3, 7), np.float32)}, "got [2, 3, 7]"),
    ({"reset": np.array(["x"], dtype=object)}, "input 'reset' must be BOOL, got BYTES"),
    ({"reset": None}, "missing input 'reset' (BOOL, shape [1])"),
])
def test_inputs_that_do_not_fit_the_model_are_named(change, words):
    arrays = {**GOOD, **change}
    arrays = {name: array for name, array in arrays.items() if array is not None}
    with pytest.raises(InvalidV2Request) as e:
        check_inputs(request_with(**arrays), METAS)
    assert words in e.value.message


def test_an_unknown_requested_output_is_named():
    request = handmade({"inputs": [X], "outputs": [{"name": "logits"}, {"name": "nope"}]})
    with pytest.raises(InvalidV2Request, match="unknown output 'nope'; the model's outputs are "
                                               "'logits', 'state'"):
        resolve_binary(request, ["logits", "state"])
