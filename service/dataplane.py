"""The data plane: the one place a request is validated, its model and session resolved,
run, and its answer shaped. Every transport (v1 HTTP and its hot /step path, the WebSocket,
the Open Inference Protocol's routes, the OpenAI-style routes) is a thin layer over it: it
turns bytes into a call here and the answer (or the ServiceError raised) into bytes.

The v1 API is the byte LM's: text or tokens in, the next-token answer out, generation. The
Open Inference Protocol serves every model through its named tensors (v2.py). Both reach
the same sessions, scheduler and adapters, so a v2 sequence of a byte LM and a v1 session
of it batch together.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from typing import TYPE_CHECKING

import numpy as np

from . import portable, views
from .bytelm import Answer, digest
from .errors import (
    EmptyInput,
    InvalidInput,
    InvalidState,
    RequestTooLarge,
    TooManyTokens,
    UnsupportedModel,
)
from .generation import Generation
from .registry import ModelVersion
from .sampling import SamplingParams
from .schemas import (
    CreateSessionRequest,
    ForkRequest,
    GenerateRequest,
    ImportSessionRequest,
    PredictRequest,
    StepRequest,
    parse,
    to_tokens,
)
from .sessions import Step
from .store import SessionRecord

if TYPE_CHECKING:
    from .runtime import Service


def version_param(raw: str | None) -> int | None:
    """A `?version=N` query parameter (ASCII digits only: '²' is a digit to str.isdigit)."""
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise InvalidInput(f"version must be a non-negative integer, got {raw!r}")
    return int(raw)


class DataPlane:
    def __init__(self, service: Service) -> None:
        self.service = service

    @property
    def settings(self):
        return self.service.settings

    # ------------------------------------------------------------------ models

    def model(self, name: str, version: int | None = None) -> ModelVersion:
        return self.service.registry.get(name, version)

    def lm(self, name: str, version: int | None = None) -> ModelVersion:
        """A byte LM version: the v1 API's text and tokens need one."""
        mv = self.model(name, version)
        if not mv.is_lm:
            raise UnsupportedModel(
                f"model {name!r} is a tensor model: it takes named tensors, so serve it "
                f"through the Open Inference Protocol (POST /v2/models/{name}/infer)")
        return mv

    def list_models(self) -> dict:
        registry = self.service.registry
        models = []
        for name in registry.names():
            latest = registry.get(name).version
            for mv in registry.versions_of(name):
                models.append({**mv.manifest.essentials(), "latest": mv.version == latest})
        return {"models": models}

    def describe_model(self, name: str, version: str | None) -> dict:
        registry = self.service.registry
        mv = registry.get(name, version_param(version))
        versions = [v.version for v in registry.versions_of(name)]
        return {**mv.manifest.essentials(), "latest": mv.version == versions[-1],
                "versions": versions}

    # ------------------------------------------------------------------ byte LM steps

    def lm_step(self, mv: ModelVersion, tokens: np.ndarray, k: int) -> Step:
        return Step(mv.adapter.inputs(tokens), len(tokens), k, digest(tokens))

    async def predict(self, name: str, body: bytes, query_version: str | None) -> dict:
        self.service.check_accepting()
        req: PredictRequest = parse(PredictRequest, body)
        s = self.settings
        if req.inputs is not None:
            if req.text is not None or req.tokens is not None:
                raise InvalidInput("send either inputs or a single text/tokens, not both")
            if not req.inputs:
                raise InvalidInput("inputs: send at least one input")
            if len(req.inputs) > s.max_predict_inputs:
                raise RequestTooLarge(
                    f"{len(req.inputs)} inputs; the limit is {s.max_predict_inputs} per request")
            items = [(i.text, i.tokens) for i in req.inputs]
        else:
            items = [(req.text, req.tokens)]
        budget = s.max_tokens_per_request
        inputs = []
        for text, tokens in items:
            x = to_tokens(text, tokens, required=True, limit=s.max_tokens_per_request)
            budget -= len(x)
            if budget < 0:
                raise TooManyTokens(
                    f"the inputs are over {s.max_tokens_per_request} tokens in all")
            inputs.append(x)
        version = version_param(query_version)
        if req.version is not None and version is not None and req.version != version:
            raise InvalidInput(f"version {req.version} in the body but {version} in the URL")
        mv = self.lm(name, req.version if req.version is not None else version)
        if len(inputs) > mv.scheduler.max_queue:
            raise RequestTooLarge(f"{len(inputs)} inputs can never fit the queue of "
                                  f"{mv.scheduler.max_queue}; send fewer at once")
        steps = [self.lm_step(mv, x, req.top_k) for x in inputs]
        outcomes = await self.service.sessions.predict(mv, steps)
        outputs = []
        for x, outcome in zip(inputs, outcomes, strict=True):
            answer = mv.adapter.answer(outcome.result, outcome.row, len(x), mv.layout)
            fields = views.answer_fields(answer, req.return_logits)
            del fields["position"]
            outputs.append({"length": len(x), **fields})
        return {"model": mv.name, "version": mv.version, "outputs": outputs}

    async def create_session(self, body: bytes, scope: dict, content_type: str = "") -> dict:
        """A new session: from a model (optionally primed), or from a portable session's
        blob, sent raw (its media type) or as {"state": base64} (import_session)."""
        self.service.check_accepting()
        if content_type.split(";")[0].strip().lower() == portable.MEDIA_TYPE:
            return await self.import_session(body, None, scope)
        if b'"state"' in body:
            req = parse(ImportSessionRequest, body)
            try:
                blob = base64.b64decode(req.state, validate=True)
            except (binascii.Error, ValueError):
                raise InvalidState("state: not base64") from None
            return await self.import_session(blob, req.ttl_s, scope)
        req: CreateSessionRequest = parse(CreateSessionRequest, body)
        tokens = to_tokens(req.text, req.tokens, required=False,
                           limit=self.settings.max_tokens_per_request)
        mv = self.lm(req.model, req.version)
        record, answer = await self.create_lm_session(mv, req.ttl_s, tokens, req.top_k)
        scope["carousel.model"] = record.model
        out = views.session_body(record)
        if answer is not None:
            out.update(views.answer_fields(answer, req.return_logits))
        return out

    async def step(self, session_id: str, body: bytes | str | dict, scope: dict) -> dict:
        """A step from its JSON body (or a WebSocket frame's object) to its answer."""
        self.service.check_accepting()
        req: StepRequest = parse(StepRequest, body)
        tokens = to_tokens(req.text, req.tokens, required=True,
                           limit=self.settings.max_tokens_per_request)
        record, answer = await self.step_tokens(session_id, tokens, req.position, req.top_k)
        scope["carousel.model"] = record.model
        return views.step_body(session_id, answer, req.return_logits)

    async def step_tokens(self, session_id: str, tokens: np.ndarray, position: int | None,
                          k: int) -> tuple[SessionRecord, Answer]:
        """Step a byte LM session with tokens (a retry with `position` is answered again)."""

        def prepare(mv: ModelVersion) -> Step:
            if not mv.is_lm:
                self.lm(mv.name, mv.version)  # raises: not a byte LM session
            return self.lm_step(mv, tokens, k)

        record, outcome = await self.service.sessions.step(
            session_id, prepare, position, replay=self._lm_replay)
        mv = self.model(record.model, record.version)
        return record, mv.adapter.answer(outcome.result, outcome.row, outcome.position,
                                         mv.layout)

    async def create_lm_session(self, mv: ModelVersion, ttl_s: float | None,
                                tokens: np.ndarray | None, k: int
                                ) -> tuple[SessionRecord, Answer | None]:
        """A byte LM session, primed with tokens if given."""
        step = None if tokens is None else self.lm_step(mv, tokens, k)
        record, outcome = await self.service.sessions.create(mv, ttl_s, step)
        if outcome is None:
            return record, None
        return record, mv.adapter.answer(outcome.result, outcome.row, outcome.position,
                                         mv.layout)

    @staticmethod
    def _lm_replay(mv: ModelVersion, record, step: Step):
        answer = mv.adapter.replay(record.row, record.position, step.options, mv.layout)
        return answer.top_tokens, answer.top_logprobs

    # ------------------------------------------------------------------ generation

    def generation_args(self, req: GenerateRequest) -> dict:
        """The options of a generation, checked (a seed chosen when none is given)."""
        limit = self.settings.max_generate_tokens
        if req.max_tokens > limit:
            raise InvalidInput(f"max_tokens: at most {limit} per generation")
        stop = tuple(s.encode("utf-8", errors="surrogatepass") for s in (req.stop or ()))
        if any(not s for s in stop):
            raise InvalidInput("stop: stop strings must not be empty")
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        return {"params": SamplingParams(req.temperature, req.top_k, req.top_p), "seed": seed,
                "max_tokens": req.max_tokens, "stop": stop, "stream": req.stream}

    async def start_generation(self, session_id: str, args: dict) -> Generation:
        """Start a generation on a session with checked options (generation_args)."""
        self.service.check_accepting()

        def make(mv: ModelVersion, record) -> Generation:
            if not mv.is_lm:
                self.lm(mv.name, mv.version)
            if record.position == 0:
                raise EmptyInput("the session has consumed no input yet, so there is "
                                   "nothing to continue: step or prime it with some text first")
            return Generation(key=session_id, row=record.row, position=record.position,
                              model=record.model, **args)

        return await self.service.sessions.start_stream(session_id, make)

    async def generate(self, session_id: str, body: bytes) -> tuple[Generation, dict]:
        self.service.check_accepting()
        req: GenerateRequest = parse(GenerateRequest, body)
        args = self.generation_args(req)
        return await self.start_generation(session_id, args), args

    # ------------------------------------------------------------------ sessions

    async def get_session(self, session_id: str, scope: dict) -> dict:
        record = await self.service.sessions.get(session_id)
        scope["carousel.model"] = record.model
        return views.session_body(record)

    async def import_session(self, blob: bytes, ttl_s: float | None, scope: dict) -> dict:
        meta, arrays = portable.read_meta(blob)
        mv = self.model(meta["model"], meta["version"])
        if not mv.is_lm:
            raise UnsupportedModel(
                f"model {mv.name!r} is a tensor model: restore its state as a v2 sequence "
                f"(PUT /v2/models/{mv.name}/sequences/{{sequence_id}}/state)")
        row = portable.to_row(meta, arrays, mv)
        record = await self.service.sessions.restore(mv, row, meta["position"], ttl_s)
        scope["carousel.model"] = record.model
        return views.session_body(record)

    async def export_session(self, session_id: str, scope: dict) -> bytes:
        """The session as a portable blob (portable.py)."""
        record = await self.service.sessions.get(session_id)
        scope["carousel.model"] = record.model
        return portable.export(record, self.model(record.model, record.version))

    async def delete_session(self, session_id: str) -> None:
        await self.service.sessions.delete(session_id)

    async def fork(self, session_id: str, body: bytes, scope: dict) -> dict:
        self.service.check_accepting()
        ttl = parse(ForkRequest, body).ttl_s if body.strip() else None  # the body is optional
        record = await self.service.sessions.fork(session_id, ttl)
        scope["carousel.model"] = record.model
        return {**views.session_body(record), "parent_id": session_id}
