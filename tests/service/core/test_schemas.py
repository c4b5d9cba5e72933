"""Request validation: strict types, unknown fields refused, the service's error codes."""

from __future__ import annotations

import numpy as np
import pytest
from carousel.service.errors import (
    EmptyInput,
    InvalidInput,
    InvalidJson,
    TokenOutOfRange,
    TooManyTokens,
    error_body,
)
from carousel.service.schemas import GenerateRequest, StepRequest, parse, to_tokens


def test_a_good_step_parses_with_defaults():
    req = parse(StepRequest, b'{"tokens": [1, 2], "position": 4}')
    assert (req.tokens, req.position, req.top_k, req.return_logits) == ([1, 2], 4, 5, False)


@pytest.mark.parametrize("body, error, words", [
    (b"{nope", InvalidJson, "not valid JSON"),
    (b"", InvalidJson, "not valid JSON"),
    (b"[1, 2]", InvalidInput, "JSON object"),
    (b'{"tokens": ["1"]}', InvalidInput, "tokens.0"),
    (b'{"tokens": [1.0]}', InvalidInput, "tokens.0"),
    (b'{"tokens": [true]}', InvalidInput, "tokens.0"),
    (b'{"text": 5}', InvalidInput, "text"),
    (b'{"text": "a", "position": -1}', InvalidInput, "position"),
    (b'{"text": "a", "top_k": 257}', InvalidInput, "top_k"),
    (b'{"text": "a", "typo": 1}', InvalidInput, "unknown field 'typo'"),
])
def test_bad_bodies_get_the_right_error(body, error, words):
    with pytest.raises(error) as e:
        parse(StepRequest, body)
    assert type(e.value) is error and words in e.value.message


@pytest.mark.parametrize("body", [
    b'{"max_tokens": 0}', b'{"max_tokens": -5}', b'{"temperature": -0.1}',
    b'{"temperature": 1e999}', b'{"top_p": 0}', b'{"top_p": 1.5}', b'{"top_k": -1}',
    b'{"seed": -1}', b'{"stop": "x"}', b'{"stream": "yes"}',
])
def test_invalid_sampling_values_are_422(body):
    with pytest.raises(InvalidInput) as e:
        parse(GenerateRequest, body)
    assert e.value.status == 422 and error_body(e.value)["error"]["code"] == "invalid_input"


def test_input_to_tokens():
    assert to_tokens("hé", None, required=True, limit=10).tolist() == [104, 195, 169]
    assert to_tokens(None, [0, 255], required=True, limit=10).dtype == np.int64
    assert to_tokens(None, None, required=False, limit=10) is None
    with pytest.raises(InvalidInput, match="either text or tokens"):
        to_tokens("a", [1], required=True, limit=10)
    with pytest.raises(InvalidInput, match="text or tokens"):
        to_tokens(None, None, required=True, limit=10)
    with pytest.raises(EmptyInput):
        to_tokens("", None, required=True, limit=10)
    with pytest.raises(TooManyTokens) as e:
        to_tokens("x" * 11, None, required=True, limit=10)
    assert e.value.status == 413
    with pytest.raises(TokenOutOfRange):
        to_tokens(None, [2**70], required=True, limit=10)
