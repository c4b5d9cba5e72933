"""The OpenAPI document (/openapi.json, shown at /docs): every HTTP route, what it accepts and
every answer it gives, true enough that a fuzzer holding the server to it (schemathesis, in
tests/service/test_e2e_schemathesis.py) finds nothing the server does that it does not say.

The routes are plain Starlette routes (api.py explains why), so FastAPI documents none of
them; this module does, from their specs: v1 request bodies are the pydantic models that
validate them (schemas.py, with the limits this server runs with: a document is built per
app), answers are the JSON Schemas below. Each protocol's error shape is documented as the
answer to every 4xx and to 503 (a 5xx other than 503 is a bug: never documented). What JSON
Schema cannot say (that a step's text is at most `max_tokens_per_request` UTF-8 bytes) is a
413 the document lists among those 4xx.

The WebSocket (`/v1/sessions/{session_id}/ws`) is described in the API's description: OpenAPI
has no way to document one.
"""

from __future__ import annotations

import re

from fastapi import FastAPI
from pydantic.json_schema import models_json_schema

from . import api, portable
from .openai_schemas import CompletionRequest

REF = "#/components/schemas/{model}"
JSON = "application/json"


def ref(name: str) -> dict:
    return {"$ref": REF.format(model=name)}


def obj(required: dict, optional: dict | None = None, *, extra: bool = False) -> dict:
    props = {**required, **(optional or {})}
    return {"type": "object", "properties": props, "required": list(required),
            "additionalProperties": extra}


STR, INT, BOOL, NUM = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}, \
    {"type": "number"}
NULLABLE_STR = {"type": ["string", "null"]}
TIME = {"type": "string", "format": "date-time"}

TOP_K = {"type": "array", "items": obj({"token": INT, "text": STR, "logprob": NUM})}
LOGITS = {"type": "array", "items": NUM}
SESSION = obj({"session_id": STR, "model": STR, "version": INT, "position": INT,
               "created_at": TIME, "last_used_at": TIME, "expires_at": TIME, "ttl_s": NUM})

SCHEMAS = {
    "Error": obj({"error": obj({"code": STR, "message": STR}, extra=True)}),
    "ModelInfo": obj({"name": STR, "version": INT, "adapter": STR, "latest": BOOL},
                     {"versions": {"type": "array", "items": INT}}, extra=True),
    "ModelList": obj({"models": {"type": "array", "items": ref("ModelInfo")}}),
    "Prediction": obj({"model": STR, "version": INT, "outputs": {"type": "array", "items": obj(
        {"length": INT, "top_k": TOP_K}, {"logits": LOGITS})}}),
    "Session": SESSION,
    "PrimedSession": {**SESSION, "properties": {**SESSION["properties"], "top_k": TOP_K,
                                                "logits": LOGITS}},
    "Fork": {**SESSION, "properties": {**SESSION["properties"], "parent_id": STR},
             "required": [*SESSION["required"], "parent_id"]},
    "StepAnswer": obj({"session_id": STR, "position": INT, "top_k": TOP_K}, {"logits": LOGITS}),
    "GenerationResult": obj({"session_id": STR, "text": STR,
                             "tokens": {"type": "array", "items": INT},
                             "finish_reason": STR, "position": INT, "seed": INT}),
    # The Open Inference Protocol's answers
    "V2Error": obj({"error": STR}),
    "V2Server": obj({"name": STR, "version": STR, "extensions": {"type": "array",
                                                                 "items": STR}}),
    "V2Live": obj({"live": BOOL}),
    "V2Ready": obj({"ready": BOOL}),
    "V2ModelReady": obj({"name": STR, "ready": BOOL}),
    "V2Tensor": obj({"name": STR, "datatype": STR, "shape": {"type": "array", "items": INT}}),
    "V2Metadata": obj({"name": STR, "versions": {"type": "array", "items": STR},
                       "platform": STR,
                       "inputs": {"type": "array", "items": ref("V2Tensor")},
                       "outputs": {"type": "array", "items": ref("V2Tensor")}}),
    "V2InferRequest": obj({"inputs": {"type": "array", "items": obj(
        {"name": STR, "datatype": STR, "shape": {"type": "array", "items": INT}},
        {"data": {}, "parameters": {"type": "object"}}, extra=True)}},
        {"id": STR, "parameters": {"type": "object"},
         "outputs": {"type": "array", "items": {"type": "object"}}}, extra=True),
    "V2InferResponse": obj({"model_name": STR, "outputs": {"type": "array", "items": obj(
        {"name": STR, "datatype": STR, "shape": {"type": "array", "items": INT}},
        {"data": {"type": "array"}, "parameters": {"type": "object"}})}},
        {"model_version": STR, "id": STR, "parameters": {"type": "object"}}),
    # OpenAI's
    "OpenAIError": obj({"error": obj({"message": STR, "type": STR, "param": NULLABLE_STR,
                                      "code": STR}, {"carousel": {"type": "object"}})}),
    "OpenAIModel": obj({"id": STR, "object": {"const": "model"}, "created": INT,
                        "owned_by": STR}),
    "OpenAIModelList": obj({"object": {"const": "list"},
                            "data": {"type": "array", "items": ref("OpenAIModel")}}),
    "Completion": obj({"id": STR, "object": {"const": "text_completion"}, "created": INT,
                       "model": STR, "choices": {"type": "array", "items": obj(
                           {"text": STR, "index": INT, "logprobs": {"type": "null"},
                            "finish_reason": NULLABLE_STR})}},
                      {"usage": obj({"prompt_tokens": INT, "completion_tokens": INT,
                                     "total_tokens": INT}),
                       "carousel": obj({"session_id": STR, "position": INT})}),
    # Health
    "Health": obj({"status": STR}),
    "Ready": obj({"status": STR}, {"models": INT, "error": obj({"code": STR, "message": STR})}),
}

TEXT = {"type": "string"}
BLOB = {portable.MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}}


def content(schema: dict, media: str = JSON) -> dict:
    return {media: {"schema": schema}}


def answers(status: int, body: dict | None, error: str, description: str = "success") -> dict:
    out = {str(status): {"description": description}}
    if body is not None:
        out[str(status)]["content"] = body
    failed = {"description": "refused: the body says why", "content": content(ref(error))}
    return {**out, "4XX": failed, "503": {**failed, "description": "busy or shutting down; "
                                                                   "retry after Retry-After"}}


# ---------------------------------------------------------------------------- v1


V1_ANSWERS = {
    "list_models": (content(ref("ModelList")),),
    "get_model": (content(ref("ModelInfo")),),
    "predict": (content(ref("Prediction")),),
    "create_session": (content(ref("PrimedSession")),),
    "step": (content(ref("StepAnswer")),),
    "generate": ({**content(ref("GenerationResult")), **content(TEXT, "text/event-stream")},),
    "get_session": (content(ref("Session")),),
    "delete_session": (None,),
    "fork_session": (content(ref("Fork")),),
    "export_session": (BLOB,),
}

VERSION = {"type": "integer", "minimum": 0, "maximum": 10**18 - 1}


def v1_operation(r: api.RouteSpec) -> dict:
    params = [{"name": name, "in": "path", "required": True, "schema": STR}
              for name in re.findall(r"{(\w+)}", r.path)]
    params += [{"name": name, "in": "query", "required": False, "schema": VERSION}
               for name in r.query]
    (body,) = V1_ANSWERS[r.endpoint.__name__]
    op = {"tags": [r.tag], "summary": r.summary, "operationId": r.endpoint.__name__,
          "parameters": params, "responses": answers(r.status, body, "Error")}
    if r.body is not None:
        op["requestBody"] = {"required": r.body is not api.ForkRequest,
                             "content": content(ref(r.body.__name__))}
        if r.endpoint.__name__ == "create_session":  # or a portable session's blob
            op["requestBody"]["content"].update(BLOB)
    return op


def tighten(schemas: dict, settings) -> None:
    """What the request models' types do not say, the server's checks do: add it."""
    one_input = {"anyOf": [
        {"required": ["text"], "properties": {"text": {"type": "string"}}},
        {"required": ["tokens"], "properties": {"tokens": {"type": "array"}}}],
        "not": {"required": ["text", "tokens"],
                "properties": {"text": {"type": "string"}, "tokens": {"type": "array"}}}}
    for name in ("StepRequest", "PredictInput", "CreateSessionRequest", "PredictRequest"):
        props = schemas[name]["properties"]
        props["text"].update(minLength=1)
        props["tokens"].update(minItems=1, items={"type": "integer", "minimum": 0,
                                                  "maximum": 255})
        if name in ("StepRequest", "PredictInput"):
            schemas[name].update(one_input)
    predict = schemas["PredictRequest"]
    predict["properties"]["inputs"].update(minItems=1, maxItems=settings.max_predict_inputs)
    has_inputs = {"required": ["inputs"], "properties": {"inputs": {"type": "array"}}}
    predict["oneOf"] = [{**one_input, "not": {"anyOf": [one_input["not"], has_inputs]}},
                        {"required": ["inputs"], "properties": {"inputs": {"type": "array"}},
                         "not": {"anyOf": [
                             {"required": ["text"], "properties": {"text": {"type": "string"}}},
                             {"required": ["tokens"],
                              "properties": {"tokens": {"type": "array"}}}]}}]
    create = schemas["CreateSessionRequest"]
    create["properties"]["ttl_s"].update(maximum=settings.max_session_ttl_s)
    create["not"] = one_input["not"]
    gen = schemas["GenerateRequest"]["properties"]
    gen["max_tokens"]["maximum"] = settings.max_generate_tokens
    gen["stop"].update(items={"type": "string", "minLength": 1})
    fork = schemas["ForkRequest"]["properties"]
    fork["ttl_s"].update(maximum=settings.max_session_ttl_s)


# ---------------------------------------------------------------------------- the others


V2_VERSION = {"name": "version", "in": "path", "required": True,
              "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"}}
NAME = {"name": "name", "in": "path", "required": True, "schema": STR}


def v2_paths() -> dict:
    paths: dict = {}

    def add(path: str, method: str, op_id: str, summary: str, body: dict | None = None,
            request: dict | None = None) -> None:
        params = [NAME] if "{name}" in path else []
        params += [V2_VERSION] if "{version}" in path else []
        op = {"tags": ["open inference protocol"], "summary": summary, "operationId": op_id,
              "parameters": params, "responses": answers(200, body, "V2Error")}
        if request is not None:
            op["requestBody"] = {"required": True, "content": request}
        paths.setdefault(path, {})[method] = op

    add("/v2", "get", "v2_server", "Server metadata", content(ref("V2Server")))
    add("/v2/health/live", "get", "v2_live", "Liveness", content(ref("V2Live")))
    add("/v2/health/ready", "get", "v2_ready", "Readiness", content(ref("V2Ready")))
    for suffix, tag in (("", "model"), ("/versions/{version}", "version")):
        base = "/v2/models/{name}" + suffix
        add(base, "get", f"v2_{tag}_metadata", "A model's tensors",
            content(ref("V2Metadata")))
        add(base + "/ready", "get", f"v2_{tag}_ready", "A model's readiness",
            content(ref("V2ModelReady")))
        add(base + "/infer", "post", f"v2_{tag}_infer",
            "Inference; with parameters.sequence_id, a stateful sequence",
            {**content(ref("V2InferResponse")), **content(TEXT, "application/octet-stream")},
            {**content(ref("V2InferRequest")), **content(TEXT, "application/octet-stream")})
    # carousel's own: a sequence's state as a portable blob, out and back in
    state = "/v2/models/{name}/sequences/{sequence_id}/state"
    add(state, "get", "v2_sequence_state", "A sequence's state as a portable blob", BLOB)
    add(state, "put", "v2_sequence_restore", "Start a sequence from a portable blob (sent "
        f"as application/octet-stream or {portable.MEDIA_TYPE})", content({"type": "object"}),
        {**content({"type": "string", "format": "binary"}, "application/octet-stream"), **BLOB})
    for op in paths[state].values():
        op["parameters"].append({"name": "sequence_id", "in": "path", "required": True,
                                 "schema": STR})
    return paths


def openai_paths() -> dict:
    def op(op_id: str, summary: str, body: dict, **more) -> dict:
        return {"tags": ["openai"], "summary": summary, "operationId": op_id,
                "responses": answers(200, body, "OpenAIError"), **more}

    return {
        "/openai/v1/models": {"get": op("openai_models", "Models (OpenAI's shape)",
                                        content(ref("OpenAIModelList")), parameters=[])},
        "/openai/v1/models/{model}": {"get": op(
            "openai_model", "One model: `name` (latest) or `name:version`",
            content(ref("OpenAIModel")),
            parameters=[{"name": "model", "in": "path", "required": True, "schema": STR}])},
        "/openai/v1/completions": {"post": op(
            "openai_completions", "A text completion (stream: server-sent events)",
            {**content(ref("Completion")), **content(TEXT, "text/event-stream")},
            parameters=[], requestBody={"required": True,
                                        "content": content(ref("CompletionRequest"))})},
    }


def page_paths() -> dict:
    def page(op_id: str, summary: str, media: dict, params=(), status: int = 200) -> dict:
        body = {m: {"schema": TEXT} for m in media} if media else None
        return {"get": {"tags": ["pages"], "summary": summary, "operationId": op_id,
                        "parameters": list(params), "responses": answers(status, body, "Error")}}

    name = [{"name": "name", "in": "path", "required": True, "schema": STR}]
    return {
        "/": page("root", "Redirects to the playground", {}, status=307),
        "/playground": page("playground", "The playground page", ["text/html"]),
        "/playground/{name}": page("playground_file", "A file of the playground page",
                                   ["text/javascript", "text/css", "text/html",
                                    "image/x-icon"], name),
        "/favicon.ico": page("favicon", "The icon", ["image/x-icon"]),
        "/docs": page("docs", "This document in Swagger UI", ["text/html"]),
        "/docs/{name}": page("docs_file", "A file of Swagger UI",
                             ["text/javascript", "text/css"], name),
        "/healthz": {"get": {"tags": ["health"], "summary": "The process is alive",
                             "operationId": "healthz", "parameters": [],
                             "responses": answers(200, content(ref("Health")), "Error")}},
        "/readyz": {"get": {"tags": ["health"], "summary": "Models loaded, store reachable "
                            "(503 until then)", "operationId": "readyz", "parameters": [],
                            "responses": {**answers(200, content(ref("Ready")), "Error"),
                                          "503": {"description": "not ready",
                                                  "content": content(ref("Ready"))}}}},
        "/metrics": {"get": {"tags": ["health"], "summary": "Prometheus metrics (text format)",
                             "operationId": "metrics", "parameters": [],
                             "responses": answers(200, content(TEXT, "text/plain"), "Error")}},
    }


def build(app: FastAPI, settings) -> dict:
    bodies = {r.body for r in api.ROUTES if r.body is not None} | {CompletionRequest}
    _, defs = models_json_schema([(m, "validation") for m in bodies], ref_template=REF)
    schemas = {**defs.get("$defs", {}), **SCHEMAS}
    tighten(schemas, settings)
    paths: dict = {}
    for r in sorted(api.ROUTES, key=lambda r: r.path):
        paths.setdefault(r.path, {})[r.method.lower()] = v1_operation(r)
    paths.update(v2_paths())
    paths.update(openai_paths())
    paths.update(page_paths())
    return {"openapi": "3.1.0",
            "info": {"title": app.title, "version": app.version,
                     "description": app.description},
            "paths": paths, "components": {"schemas": schemas}}


def install_openapi(app: FastAPI) -> None:
    settings = app.state.service.settings

    def openapi() -> dict:
        if not app.openapi_schema:
            app.openapi_schema = build(app, settings)
        return app.openapi_schema

    app.openapi = openapi
