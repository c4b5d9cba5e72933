"""The OpenAPI document held to the server: schemathesis generates requests for every
operation in /openapi.json (valid ones and invalid ones) against a real server, and every
answer must be no server error, a documented status, a documented content type, documented
headers and a body that matches its documented schema.

Bounded: `EXAMPLES` requests per operation and mode, no shrinking. One test per operation
(the list is read from the same document built in this process; the server's own document is
what the requests are drawn from). Run with and without an API key: the keyed half needs the
server's `api_keys` setting (API keys are being added separately), so it joins the
parametrization only once Settings has that field: no skipped test.

schemathesis' own pytest loader (`from_fixture`) does not run under this pytest, so each test
draws cases from the operation's hypothesis strategy (`as_strategy`) itself.
"""

from __future__ import annotations

import pytest
import schemathesis
from carousel.service.app import create_app
from carousel.service.settings import Settings
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

EXAMPLES = 12
KEY = "schemathesis-test-key"
MODES = ["no-key"] + (["key"] if "api_keys" in Settings.model_fields else [])
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, response_headers_conformance]
OPERATIONS = [(method.upper(), path)
              for path, ops in create_app(Settings()).openapi()["paths"].items()
              for method in ops]


@pytest.fixture(scope="module", params=MODES)
def keyed_server(request, start_server, tiny_repo, check):
    env = {"CAROUSEL_MODEL_REPOSITORY": str(tiny_repo[0]), **check.LIMITS,
           "CAROUSEL_MAX_GENERATE_TOKENS": "64"}
    if request.param == "key":
        env["CAROUSEL_API_KEYS"] = f"schemathesis:{KEY}"  # tenant:KEY
    server = start_server(f"schemathesis-{request.param}", env)
    headers = {"Authorization": f"Bearer {KEY}"} if request.param == "key" else {}
    return server, schemathesis.openapi.from_url(server.url + "/openapi.json"), headers


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_every_answer_is_documented(keyed_server, method, path):
    server, schema, headers = keyed_server
    operation = schema[path][method]
    cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE),
                      operation.as_strategy(GenerationMode.NEGATIVE))

    @given(case=cases)
    @settings(max_examples=EXAMPLES, deadline=None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck), database=None)
    def answered_as_documented(case):
        case.call_and_validate(base_url=server.url, headers=headers, checks=CHECKS, timeout=60)

    answered_as_documented()
