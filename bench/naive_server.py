"""The naive baseline: what a user writes in an afternoon to serve the model with sessions.

A minimal FastAPI app with the same API shape as carousel (create a session, step it over
HTTP or a WebSocket, stream a generation, predict), one onnxruntime call per request on the
event loop, a plain dict of per-session state, no batching, no limits, no metrics.

    python -m carousel.bench.naive_server --model-repository models --model bytelm --port 8002
"""

from __future__ import annotations

import argparse
import json
import secrets
from pathlib import Path

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, HTTPException, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse
from pydantic import BaseModel


class StepBody(BaseModel):
    text: str | None = None
    tokens: list[int] | None = None
    top_k: int = 5


class CreateBody(StepBody):
    model: str


class GenerateBody(BaseModel):
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stream: bool = True


class PredictBody(BaseModel):
    inputs: list[StepBody]
    top_k: int = 5


def tokens_of(body: StepBody) -> list[int]:
    return body.tokens if body.tokens is not None else list((body.text or "").encode())


def create_app(model_dir: Path) -> FastAPI:
    manifest = json.loads((model_dir / "manifest.json").read_text())
    graph = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    pairs = [(p["input"], p["output"], p["shape"]) for p in manifest["state"]]
    outputs = ["logits"] + [out for _, out, _ in pairs]
    sessions: dict[str, dict] = {}  # id -> {"state": {...}, "logits": last row, "position"}

    def zero_state(batch: int) -> dict:
        return {name: np.zeros([batch if isinstance(d, str) else d for d in shape], np.float32)
                for name, _, shape in pairs}

    def run(tokens: list[list[int]], state: dict):
        width = max(len(t) for t in tokens)
        batch = np.zeros((len(tokens), width), np.int64)
        for row, seq in enumerate(tokens):
            batch[row, : len(seq)] = seq
        lengths = np.array([len(t) for t in tokens], np.int32)
        logits, *new = graph.run(outputs, {"tokens": batch, "lengths": lengths, **state})
        last = logits[np.arange(len(tokens)), lengths - 1]
        return last, {name: s for (name, _, _), s in zip(pairs, new, strict=True)}

    def top(logits: np.ndarray, k: int) -> list[dict]:
        logprobs = logits.astype(np.float64) - logits.max()
        logprobs = logprobs - np.log(np.exp(logprobs).sum())
        best = np.argsort(-logprobs)[:k]
        return [{"token": int(t), "text": bytes([t]).decode(errors="replace"),
                 "logprob": float(logprobs[t])} for t in best]

    def step(session_id: str, body: StepBody) -> dict:
        session = sessions.get(session_id)
        if session is None:
            raise HTTPException(404, "unknown session")
        tokens = tokens_of(body)
        last, session["state"] = run([tokens], session["state"])
        session["logits"] = last[0]
        session["position"] += len(tokens)
        return {"session_id": session_id, "position": session["position"],
                "top_k": top(last[0], body.top_k)}

    app = FastAPI(title="carousel bench naive baseline")

    @app.get("/readyz")
    async def ready() -> dict:
        return {"status": "ready"}

    @app.post("/v1/sessions", status_code=201)
    async def create_session(body: CreateBody) -> dict:
        session_id = secrets.token_urlsafe(16)
        sessions[session_id] = {"state": zero_state(1), "logits": None, "position": 0}
        answer = {"session_id": session_id, "model": body.model, "position": 0}
        if tokens_of(body):
            answer.update(step(session_id, body))
        return answer

    @app.post("/v1/sessions/{session_id}/step")
    async def step_route(session_id: str, body: StepBody) -> dict:
        return step(session_id, body)

    @app.websocket("/v1/sessions/{session_id}/ws")
    async def ws(websocket: WebSocket, session_id: str) -> None:
        await websocket.accept()
        try:
            while True:
                body = StepBody.model_validate_json(await websocket.receive_text())
                await websocket.send_text(json.dumps(step(session_id, body)))
        except WebSocketDisconnect:
            pass

    @app.post("/v1/sessions/{session_id}/generate")
    async def generate(session_id: str, body: GenerateBody) -> StreamingResponse:
        session = sessions.get(session_id)
        if session is None or session["logits"] is None:
            raise HTTPException(404, "unknown or unprimed session")
        rng = np.random.default_rng(body.seed)

        def sample(logits: np.ndarray) -> int:
            if body.top_k == 1 or body.temperature == 0:
                return int(logits.argmax())
            scaled = logits / body.temperature
            if body.top_k > 0:
                scaled = np.where(scaled >= np.sort(scaled)[-body.top_k], scaled, -np.inf)
            p = np.exp(scaled - scaled.max())
            return int(rng.choice(len(p), p=p / p.sum()))

        async def events():
            for _ in range(body.max_tokens):
                token = sample(session["logits"])
                last, session["state"] = run([[token]], session["state"])
                session["logits"] = last[0]
                session["position"] += 1
                event = {"token": token, "text": bytes([token]).decode(errors="replace"),
                         "position": session["position"]}
                yield f"data: {json.dumps(event)}\n\n"
            end = {"finish_reason": "length", "position": session["position"]}
            yield f"event: end\ndata: {json.dumps(end)}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/models/{name}/predict")
    async def predict(name: str, body: PredictBody) -> dict:
        tokens = [tokens_of(item) for item in body.inputs]
        last, _ = run(tokens, zero_state(len(tokens)))
        return {"model": name, "outputs": [{"length": len(t), "top_k": top(row, body.top_k)}
                                           for t, row in zip(tokens, last, strict=True)]}

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--model", default="bytelm")
    parser.add_argument("--version", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    args = parser.parse_args(argv)
    app = create_app(args.model_repository / args.model / str(args.version))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
