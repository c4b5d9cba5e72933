"""Portable sessions: a session's state as a documented file another carousel can restore.

`GET /v1/sessions/{id}/state` answers an npz file (numpy's zip of `.npy` arrays, media type
`application/x-carousel-session+npz`); `POST /v1/sessions` with one restores it as a new
session on any carousel serving that model version. npz rather than safetensors: numpy
alone writes and reads it (serving adds no dependency), any numpy reads it without
carousel, and it is read here with `allow_pickle=False`, so a blob can hold nothing but
arrays. Its entries:

- `meta`: a 0-d string array holding JSON: `format` ("carousel-session"),
  `format_version` (1), `model`, `version`, `manifest_sha256` (the model version's
  manifest.json; a blob restores only onto the same build), `position` (steps consumed),
  `session_id` and `created_at` of the session it came from;
- `state/<input>`: each state tensor under the graph input it is fed to, float32, shaped
  as that input with a batch of 1 (for the bundled LSTMs `state/state_h` and
  `state/state_c`, (2, 1, 512));
- `last_logits`: byte LMs only: the logits after the last consumed token, (vocab,) float32
  (the next generated token is sampled from them).
"""

from __future__ import annotations

import io
import json
import time
import zipfile

import numpy as np

from .errors import InvalidState, ModelMismatch
from .registry import ModelVersion
from .store import SessionRecord

MEDIA_TYPE = "application/x-carousel-session+npz"
FORMAT, FORMAT_VERSION = "carousel-session", 1
SLACK = 64 * 1024  # bytes a blob may hold beyond its arrays (zip and npy headers, meta)


def export(record: SessionRecord, mv: ModelVersion) -> bytes:
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": record.model,
            "version": record.version, "manifest_sha256": mv.manifest.sha256,
            "position": record.position, "session_id": record.session_id,
            "created_at": record.created_at, "exported_at": time.time()}
    arrays = {"meta": np.array(json.dumps(meta))}
    for name, tensor in mv.layout.tensors(record.row).items():
        arrays[f"state/{name}"] = tensor
    if mv.layout.extra_size:
        arrays["last_logits"] = np.array(mv.layout.extra(record.row), dtype=np.float32)
    out = io.BytesIO()
    np.savez(out, **arrays)
    return out.getvalue()


def read_meta(blob: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    """The blob's meta and arrays, checked for shape only (InvalidState otherwise)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(blob))
        # Refuse a blob that would inflate far past any session's state before reading it.
        if sum(i.file_size for i in archive.infolist()) > 64 * len(blob) + SLACK:
            raise InvalidState("the session blob inflates to far more than it holds")
        with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        meta = json.loads(str(arrays.pop("meta")[()]))
    except InvalidState:
        raise
    except (zipfile.BadZipFile, ValueError, KeyError, OSError, EOFError, TypeError,
            IndexError) as e:
        raise InvalidState("the body is not a carousel session blob (an npz file from GET "
                           f"/v1/sessions/{{id}}/state): {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InvalidState(f"the blob's meta is not a {FORMAT!r} meta")
    if meta.get("format_version") != FORMAT_VERSION:
        raise InvalidState(f"format_version {meta.get('format_version')!r}; this server "
                           f"reads version {FORMAT_VERSION}")
    for key, kind in (("model", str), ("version", int), ("manifest_sha256", str),
                      ("position", int)):
        value = meta.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise InvalidState(f"the blob's meta has no {kind.__name__} {key!r}")
    if meta["position"] < 0:
        raise InvalidState("the blob's position is negative")
    return meta, arrays


def to_row(meta: dict, arrays: dict[str, np.ndarray], mv: ModelVersion) -> np.ndarray:
    """The session row the blob holds, for this model version (ModelMismatch if the blob
    is from another build of it, InvalidState if its tensors do not fit)."""
    if meta["manifest_sha256"] != mv.manifest.sha256:
        raise ModelMismatch(
            f"the session was made by another build of {mv.name} version {mv.version} "
            f"(manifest sha256 {meta['manifest_sha256'][:12]}…, this server has "
            f"{mv.manifest.sha256[:12]}…); it cannot be restored here")
    layout = mv.layout
    wanted = {f"state/{s.input}" for s in layout.states}
    if layout.extra_size:
        wanted.add("last_logits")
    if set(arrays) != wanted:
        raise InvalidState(f"the blob holds {sorted(arrays)}; this model needs {sorted(wanted)}")
    parts = []
    for spec in layout.states:
        x = arrays[f"state/{spec.input}"]
        shape = list(spec.shape)
        shape.insert(spec.batch_axis, 1)
        if x.dtype != np.float32 or list(x.shape) != shape:
            raise InvalidState(f"state/{spec.input} must be float32 {shape}; it is "
                               f"{x.dtype} {list(x.shape)}")
        parts.append(np.squeeze(x, axis=spec.batch_axis).reshape(-1))
    if layout.extra_size:
        x = arrays["last_logits"]
        if x.dtype != np.float32 or x.shape != (layout.extra_size,):
            raise InvalidState(f"last_logits must be float32 [{layout.extra_size}]")
        parts.append(x)
    row = np.concatenate(parts).astype(np.float32, copy=False)
    if not np.isfinite(row).all():
        raise InvalidState("the blob's state holds NaN or infinite values")
    row.flags.writeable = False
    return row
