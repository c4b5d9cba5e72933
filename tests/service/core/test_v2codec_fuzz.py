"""Property-based fuzzing of the v2 codec (Hypothesis, bounded to a few seconds).

Two kinds of property:
- round trips with the real client: random tensors of every datatype and shape, binary or JSON,
  serialised by tritonclient parse to the same tensors, and encoded responses read back by
  tritonclient as the same tensors;
- refusal: arbitrary bytes, near-valid JSON documents and mutated valid bodies either parse
  or raise InvalidV2Request, never anything else.
"""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import tritonclient.http as triton
from carousel.service.v2codec import (
    DATATYPES,
    InvalidV2Request,
    RequestedOutput,
    Sequence,
    TensorMeta,
    check_inputs,
    encode_error,
    encode_infer_response,
    parse_infer_request,
    resolve_binary,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

HEADER = "Inference-Header-Content-Length"


def fuzz(examples: int) -> settings:
    # No example database, so nothing is written into the work tree; a failure prints its
    # example. No deadline: the runtime is bounded by the example count, not by a clock.
    return settings(max_examples=examples, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)
names = st.text(min_size=1, max_size=6)


@st.composite
def tensors(draw, *, utf8: bool) -> tuple[str, np.ndarray]:
    """A random datatype and an array of it; BYTES only UTF-8 text when it goes as JSON."""
    datatype = draw(st.sampled_from(list(DATATYPES)))
    shape = draw(shapes)
    if datatype != "BYTES":
        return datatype, draw(hnp.arrays(DATATYPES[datatype], shape))
    element = st.text(max_size=6).map(str.encode) if utf8 else st.binary(max_size=6)
    count = math.prod(shape)
    flat = np.empty(count, dtype=object)
    flat[:] = draw(st.lists(element, min_size=count, max_size=count))
    return datatype, flat.reshape(shape)


def assert_same(got: np.ndarray, want: np.ndarray, *, exact_bits: bool) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    if want.dtype.kind == "f":
        assert np.array_equal(got, want, equal_nan=True)
        if exact_bits:
            assert got.tobytes() == want.tobytes()
        else:  # JSON keeps every value and the sign of zero, but has only one NaN
            assert (np.signbit(got) == np.signbit(want))[~np.isnan(want)].all()
    elif want.dtype.kind == "O":
        assert got.tolist() == want.tolist()
    else:
        assert np.array_equal(got, want)


@st.composite
def client_requests(draw):
    """A request built and serialised by tritonclient, with what it should parse to."""
    tensor_names = draw(st.lists(names, min_size=1, max_size=3, unique=True))
    inputs, expected = [], {}
    for name in tensor_names:
        binary = draw(st.booleans())
        datatype, array = draw(tensors(utf8=not binary))
        tensor = triton.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
        expected[name] = (array, binary)
    asked = draw(st.none() | st.lists(st.tuples(names, st.booleans()), max_size=3,
                                      unique_by=lambda pair: pair[0]))
    sequence_id = draw(st.just(0) | st.integers(1, 2**64 - 1) | st.text(min_size=1, max_size=6))
    start, end = draw(st.booleans()), draw(st.booleans())
    request_id = draw(st.text(max_size=6))
    body, header_length = triton.InferenceServerClient.generate_request_body(
        inputs, request_id=request_id, sequence_id=sequence_id, sequence_start=start,
        sequence_end=end,
        outputs=None if asked is None else [triton.InferRequestedOutput(name, binary_data=flag)
                                            for name, flag in asked])
    sequence = Sequence(sequence_id, start, end) if sequence_id != 0 else None
    return body, header_length, {"inputs": expected, "asked": asked, "sequence": sequence,
                                 "id": request_id or None}


def parse_or_refuse(body: bytes, header_length):
    """Parse, or refuse with a 400 whose message can be sent; nothing else may happen."""
    try:
        request = parse_infer_request(body, header_length)
    except InvalidV2Request as e:
        assert e.status == 400 and e.message
        assert json.loads(encode_error(e.message)) == {"error": e.message}
        e.message.encode("utf-8")  # no lone surrogates reach an error body
        return None
    for array in request.inputs.values():
        assert isinstance(array, np.ndarray) and array.dtype in DATATYPES.values()
    # what the server does next with a parsed request raises nothing but InvalidV2Request
    for check in (lambda: check_inputs(request, [TensorMeta("x", "FP32", (-1,))]),
                  lambda: resolve_binary(request, ["y", "z"])):
        try:
            check()
        except InvalidV2Request:
            pass
    return request


# --- round trips with the real client -------------------------------------------------------

@fuzz(200)
@given(client_requests())
def test_random_tritonclient_requests_parse_to_their_tensors(built):
    body, header_length, expected = built
    request = parse_infer_request(body, header_length)
    assert list(request.inputs) == list(expected["inputs"])
    for name, (array, binary) in expected["inputs"].items():
        assert_same(request.inputs[name], array, exact_bits=binary)
    assert request.sequence == expected["sequence"] and request.id == expected["id"]
    if expected["asked"]:
        assert request.outputs == [RequestedOutput(n, flag) for n, flag in expected["asked"]]
    else:  # tritonclient asks for every output, binary
        assert request.outputs is None and request.binary_output_default is True


@fuzz(200)
@given(st.data())
def test_random_encoded_responses_read_back_through_tritonclient(data):
    output_names = data.draw(st.lists(names, min_size=1, max_size=3, unique=True))
    outputs, binary = [], {}
    for name in output_names:
        binary[name] = data.draw(st.booleans())
        datatype, array = data.draw(tensors(utf8=not binary[name]))
        outputs.append((TensorMeta(name, datatype, array.shape), array))
    request_id = data.draw(st.none() | st.text(max_size=6))
    body, headers = encode_infer_response(model_name="m", model_version="2",
                                          request_id=request_id, outputs=outputs, binary=binary)
    length = headers.get(HEADER)
    assert (length is not None) == any(binary.values())
    result = triton.InferenceServerClient.parse_response_body(
        body, header_length=None if length is None else int(length))
    assert result.get_response().get("id") == request_id
    for meta, array in outputs:
        got = result.as_numpy(meta.name)
        if meta.datatype == "BYTES" and not binary[meta.name]:  # JSON strings come back as str
            assert got.shape == array.shape
            assert got.tolist() == np.vectorize(bytes.decode, otypes=[object])(array).tolist()
        else:
            assert_same(got, array, exact_bits=binary[meta.name])


# --- refusal --------------------------------------------------------------------------------

header_lengths = st.none() | st.integers(-3, 500) | st.text(max_size=6)


@fuzz(400)
@given(st.binary(max_size=400), header_lengths)
def test_arbitrary_bytes_parse_or_are_refused(body, header_length):
    parse_or_refuse(body, header_length)


FIELDS = ["id", "parameters", "inputs", "outputs", "name", "shape", "datatype", "data",
          "binary_data_size", "binary_data", "binary_data_output", "sequence_id",
          "sequence_start", "sequence_end", "shared_memory_region", "classification"]
scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats()
           | st.text(max_size=4) | st.sampled_from([*DATATYPES, "BF16", "x", "y"]))
junk = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=3), inner, max_size=4),
    max_leaves=12)


def mostly(good, bad=junk):
    """`good` nine times in ten, else `bad`: each field is usually right, so the parser gets
    past it to the next one, and any field can be the one that is wrong."""
    return st.integers(0, 9).flatmap(lambda i: bad if i == 0 else good)


def elements(datatype: str):
    """JSON values for a datatype: usually of its kind and range, sometimes anything."""
    dtype = DATATYPES[datatype]
    if datatype == "BOOL":
        good = st.booleans()
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        good = st.integers(int(info.min), int(info.max))
    elif dtype.kind == "f":
        good = st.floats(width=min(64, 8 * dtype.itemsize)) | st.integers(-1000, 1000)
    else:
        good = st.text(max_size=4)
    return mostly(good, scalars)


@st.composite
def input_docs(draw) -> tuple[dict, bytes]:
    """One $request_input that is coherent (datatype, shape, data or binary bytes) most of
    the time, and its binary bytes."""
    datatype = draw(mostly(st.sampled_from(list(DATATYPES))))
    shape = draw(mostly(st.lists(st.integers(0, 3), max_size=3),
                        st.lists(st.integers(-1, 2**64), max_size=3) | junk))
    doc = {"name": draw(mostly(st.sampled_from("abcdefgh"))), "shape": shape,
           "datatype": datatype}
    known = isinstance(datatype, str) and datatype in DATATYPES
    valid_shape = isinstance(shape, list) and all(type(d) is int and 0 <= d < 4 for d in shape)
    count = math.prod(shape) if valid_shape else draw(st.integers(0, 4))
    count += draw(mostly(st.just(0), st.integers(-1, 1)))  # sometimes off by one
    count = max(count, 0)
    if draw(st.booleans()):
        flat = draw(st.lists(elements(datatype) if known else scalars,
                             min_size=count, max_size=count))
        nest = valid_shape and len(shape) > 1 and draw(st.booleans())
        if nest:  # the same data nested row-major, as the protocol allows
            for d in reversed(shape[1:]):
                flat = [flat[i:i + d] for i in range(0, len(flat), d)] if d else []
        doc["data"] = draw(mostly(st.just(flat)))
        return doc, b""
    if known and datatype == "BYTES":
        raw = b"".join(struct.pack("<I", len(e)) + e
                       for e in draw(st.lists(st.binary(max_size=5), min_size=count,
                                              max_size=count)))
    else:
        itemsize = DATATYPES[datatype].itemsize if known else 1
        raw = draw(st.binary(min_size=count * itemsize, max_size=count * itemsize))
    raw = draw(mostly(st.just(raw), st.binary(max_size=12)))
    doc["parameters"] = {"binary_data_size": draw(mostly(st.just(len(raw)),
                                                         st.integers(-1, 40) | junk))}
    return doc, raw


@st.composite
def request_bodies(draw) -> tuple[bytes, int | str | None]:
    parts = draw(mostly(st.lists(input_docs(), max_size=3), st.just(None)))
    doc: dict = {"inputs": [d for d, _ in parts] if parts is not None else draw(junk)}
    optional = {
        "id": mostly(st.text(max_size=4)),
        "outputs": mostly(st.lists(st.fixed_dictionaries(
            {"name": mostly(st.sampled_from(["y", "z"]))},
            optional={"parameters": st.dictionaries(st.sampled_from(FIELDS), scalars)}),
            max_size=3)),
        "parameters": mostly(st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=3),
                                             scalars, max_size=4)),
    }
    for key, strategy in optional.items():
        if draw(st.booleans()):
            doc[key] = draw(strategy)
    header = json.dumps(doc).encode()
    tail = b"".join(raw for _, raw in parts or [])
    header_length = draw(mostly(st.just(len(header) if tail else None), header_lengths))
    return header + tail, header_length


@fuzz(300)
@given(request_bodies())
def test_near_valid_requests_parse_or_are_refused(built):
    parse_or_refuse(*built)


@fuzz(250)
@given(client_requests(), st.data())
def test_mutated_valid_bodies_parse_or_are_refused(built, data):
    body, header_length, _ = built
    size = len(body)
    kind = data.draw(st.sampled_from(["truncate", "flip", "insert", "header", "no header"]))
    if kind == "truncate":
        body = body[:data.draw(st.integers(0, max(size - 1, 0)))]
        header_length = None if header_length is None else min(header_length, len(body))
    elif kind == "flip":
        for _ in range(data.draw(st.integers(1, 3))):
            at = data.draw(st.integers(0, size - 1))
            body = body[:at] + bytes([body[at] ^ data.draw(st.integers(1, 255))]) + body[at + 1:]
    elif kind == "insert":
        at = data.draw(st.integers(0, size))
        body = body[:at] + data.draw(st.binary(min_size=1, max_size=8)) + body[at:]
    elif kind == "header":
        header_length = data.draw(st.integers(-2, size + 2))
    else:
        header_length = None
    parse_or_refuse(body, header_length)
