"""The Open Inference Protocol (KServe v2) on the data plane: every model through its named
tensors, stateless or as a sequence (Triton's sequence extension).

What a model shows over v2:
- a tensor model: its per-step inputs (plus any constant a request may override) and its
  result outputs, with the batch axis and every dynamic dimension as -1;
- a byte LM: `tokens` INT64 [batch, time] in and `logits` FP32 [batch, vocab] out, the
  logits after each row's last token (what its next byte is sampled from).

A request without `sequence_id` is stateless: each row of the batch runs from the zero
state (and rows batch with everything else queued). A sequence is a carousel session named
by the model and the id (so a sequence of a byte LM batches with its v1 sessions): its
requests carry batch 1, apply in arrival order, `sequence_start` starts it (afresh if the
id is live), `sequence_end` frees it after answering, and a request on an id that was never
started is refused. The session's state is the model's state pairs: no client sends them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from . import portable
from .errors import InvalidInput, NotFound, RequestTooLarge, UnknownSession
from .registry import ModelVersion
from .sessions import Step
from .v2codec import (
    InferRequest,
    InvalidV2Request,
    TensorMeta,
    check_inputs,
    encode_infer_response,
    resolve_binary,
    v2_datatype,
)

if TYPE_CHECKING:
    from .runtime import Service

EXTENSIONS = ["binary_tensor_data", "sequence"]


def sequence_key(mv: ModelVersion, sequence_id: int | str) -> str:
    """The session a sequence lives in: per model (as Triton's ids are), never a valid v1
    session id (those are URL-safe base64), typed so the int 1 and the string "1" differ."""
    kind = "i" if isinstance(sequence_id, int) else "s"
    return f"~seq~{mv.name}~{kind}~{sequence_id}"


def parse_sequence_id(raw: str) -> int | str:
    """A sequence id from a URL: ASCII digits are an integer id, anything else a string."""
    if raw.isascii() and raw.isdigit() and len(raw) <= 19 and int(raw) < 2**64:
        return int(raw)
    return raw


class V2Plane:
    def __init__(self, service: Service) -> None:
        self.service = service

    # ------------------------------------------------------------------ metadata

    def server_metadata(self, version: str) -> dict:
        return {"name": "carousel", "version": version, "extensions": EXTENSIONS}

    def model(self, name: str, version: str | None) -> ModelVersion:
        if version is not None and not (version.isascii() and version.isdigit()
                                        and len(version) <= 18):
            raise InvalidV2Request(f"model version must be an integer, got {version!r}")
        return self.service.registry.get(name, None if version is None else int(version))

    def inputs(self, mv: ModelVersion) -> list[TensorMeta]:
        m = mv.manifest
        metas = [TensorMeta(t.name, v2_datatype(t.dtype), tuple(t.dims())) for t in m.inputs]
        metas += [TensorMeta(c.name, v2_datatype(c.value.dtype), c.value.shape)
                  for c in m.constants if c.overridable]
        return metas

    def outputs(self, mv: ModelVersion) -> list[TensorMeta]:
        m = mv.manifest
        if mv.is_lm:
            return [TensorMeta(m.logits, "FP32", (-1, m.vocab_size))]
        return [TensorMeta(t.name, v2_datatype(t.dtype), tuple(t.dims())) for t in m.outputs]

    def model_metadata(self, name: str, version: str | None) -> dict:
        mv = self.model(name, version)
        meta = lambda t: {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        versions = [str(v.version) for v in self.service.registry.versions_of(mv.name)]
        return {"name": mv.name, "versions": versions if version is None else [version],
                "platform": "onnxruntime_onnx",
                "inputs": [meta(t) for t in self.inputs(mv)],
                "outputs": [meta(t) for t in self.outputs(mv)]}

    # ------------------------------------------------------------------ infer

    async def infer(self, name: str, version: str | None,
                    request: InferRequest) -> tuple[bytes, dict[str, str]]:
        self.service.check_accepting()
        mv = self.model(name, version)
        metas = self.inputs(mv)
        overridable = frozenset(c.name for c in mv.manifest.constants if c.overridable)
        check_inputs(request, metas, optional=overridable)
        outputs = self.outputs(mv)
        binary = resolve_binary(request, [t.name for t in outputs])
        wanted = outputs if request.outputs is None else [
            next(t for t in outputs if t.name == o.name) for o in request.outputs]
        steps = self._rows(mv, request.inputs)
        if request.sequence is not None:
            if len(steps) != 1:
                raise InvalidV2Request(f"a sequence request carries batch 1; this one has "
                                       f"{len(steps)} rows")
            rows = [await self._sequence(mv, request, steps[0])]
        else:
            limit = self.service.settings.max_predict_inputs
            if len(steps) > limit:
                raise RequestTooLarge(f"{len(steps)} rows; the limit is {limit} per request")
            rows = await self.service.sessions.predict(mv, steps)
            rows = [self._result(mv, o.row, o.result) for o in rows]
        tensors = [(t, self._stack(mv, t.name, [r[t.name] for r in rows])) for t in wanted]
        return encode_infer_response(
            model_name=mv.name, model_version=str(mv.version), request_id=request.id,
            outputs=tensors, binary={t.name: binary[t.name] for t in wanted})

    async def _sequence(self, mv: ModelVersion, request: InferRequest,
                        step: Step) -> dict[str, np.ndarray]:
        seq = request.sequence
        key = sequence_key(mv, seq.id)
        sessions = self.service.sessions
        if seq.start:
            record, outcome = await sessions.create(mv, None, step, session_id=key,
                                                    replace=True)
            row, result = outcome.row, outcome.result
        else:
            def prepare(running: ModelVersion) -> Step:
                if running is not mv:  # checked before anything is applied
                    raise InvalidInput(f"sequence {seq.id} runs on version {running.version} "
                                       f"of '{mv.name}', not {mv.version}")
                return step

            try:
                record, outcome = await sessions.step(key, prepare)
            except UnknownSession:
                raise InvalidInput(
                    f"inference request for sequence {seq.id} to model '{mv.name}' must "
                    "specify the START flag on the first request of the sequence") from None
            row, result = outcome.row, outcome.result
        if seq.end:
            try:
                await sessions.delete(key)
            except UnknownSession:
                pass  # expired or ended meanwhile: the answer stands
        return self._result(mv, row, result)

    # ------------------------------------------------------------------ portable state

    async def export_sequence(self, name: str, raw_id: str) -> bytes:
        """A sequence's state as a portable blob (portable.py)."""
        mv = self.model(name, None)
        seq_id = parse_sequence_id(raw_id)
        try:
            record = await self.service.sessions.get(sequence_key(mv, seq_id))
        except UnknownSession:
            raise NotFound(f"model '{mv.name}' has no sequence {seq_id!r}") from None
        return portable.export(record, self.model(record.model, str(record.version)))

    async def import_sequence(self, name: str, raw_id: str, blob: bytes) -> dict:
        """Start (or restart) a sequence from a portable blob; its next request continues
        it without sequence_start."""
        self.service.check_accepting()
        meta, arrays = portable.read_meta(blob)
        if meta["model"] != name:
            raise InvalidV2Request(f"the blob is a session of model {meta['model']!r}, "
                                   f"not {name!r}")
        mv = self.model(name, str(meta["version"]))
        seq_id = parse_sequence_id(raw_id)
        row = portable.to_row(meta, arrays, mv)
        record = await self.service.sessions.restore(
            mv, row, meta["position"], session_id=sequence_key(mv, seq_id), replace=True)
        return {"model_name": mv.name, "model_version": str(mv.version),
                "sequence_id": seq_id, "position": record.position}

    def _rows(self, mv: ModelVersion, tensors: dict[str, np.ndarray]) -> list[Step]:
        """The request's batch as one step per row (batch axes removed), each checked by
        the model's adapter."""
        m = mv.manifest
        if mv.is_lm:
            tokens = tensors[m.tokens]
            if tokens.ndim != 2:
                raise InvalidV2Request(f"{m.tokens} must be INT64 [batch, time]")
            limit = self.service.settings.max_tokens_per_request
            if tokens.size > limit:
                raise RequestTooLarge(f"{tokens.size} tokens; the limit is {limit}")
            return [self.service.plane.lm_step(mv, np.ascontiguousarray(row), 0)
                    for row in tokens]
        batch = {t.name: tensors[t.name].shape[t.batch_axis] for t in m.inputs}
        if len(set(batch.values())) != 1:
            raise InvalidV2Request(f"the inputs' batch sizes differ: {batch}")
        n = next(iter(batch.values()))
        if n == 0:
            raise InvalidV2Request("the batch is empty")
        steps = []
        for i in range(n):
            row = {t.name: np.take(tensors[t.name], i, axis=t.batch_axis) for t in m.inputs}
            row.update({c.name: tensors[c.name] for c in m.constants if c.name in tensors})
            inputs, length = mv.adapter.inputs(row)
            steps.append(Step(inputs, length, None, _digest(inputs)))
        return steps

    @staticmethod
    def _result(mv: ModelVersion, row: np.ndarray, result) -> dict[str, np.ndarray]:
        if mv.is_lm:  # the logits after the last token: the row's extras
            return {mv.manifest.logits: mv.layout.extra(row)}
        return result

    @staticmethod
    def _stack(mv: ModelVersion, name: str, rows: list[np.ndarray]) -> np.ndarray:
        axis = 0 if mv.is_lm else mv.manifest.output(name).batch_axis
        return np.stack(rows, axis=axis)


def _digest(inputs: dict[str, np.ndarray]) -> bytes:
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for name in sorted(inputs):
        h.update(name.encode())
        h.update(inputs[name].tobytes())
    return h.digest()
