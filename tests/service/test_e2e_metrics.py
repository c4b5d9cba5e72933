"""/metrics in Prometheus text: what the issue lists, named by the conventions, labelled by
model and route and never by session, and counting what really happened."""

from __future__ import annotations

import re

from carousel.model.model import encode


def test_metrics_families_and_conventions(api):
    api.create_session("tinylstm", text="metrics")
    m = api.metrics()
    kinds = {f.name: f.type for f in m.families}
    # Counters are exposed as <name>_total (the parser strips the suffix from the family).
    for fam in m.families:
        if fam.type == "counter":
            assert re.search(rf"^{re.escape(fam.name)}_total ", m.text, re.M) or re.search(
                rf"^{re.escape(fam.name)}_total{{", m.text, re.M), fam.name
    m.family("request", kind="counter")  # requests by route and status
    m.family("request", "seconds", kind="histogram")  # request duration, base unit
    m.family("queue", "seconds")  # queue wait
    m.family("inference", "seconds")  # inference duration
    m.family("batch", "size", kind="histogram")
    m.family("session", "active", kind="gauge")
    for what in ("created", "expired", "evicted"):
        m.family("session", what)
    for what in ("consum", "generat"):
        m.family("token", what, kind="counter")
    assert all("millisecond" not in name for name in kinds), kinds  # base units: seconds


def test_labels_are_models_and_routes_never_sessions(api):
    sids = [api.create_session("tinylstm", text="label")["session_id"] for _ in range(3)]
    for sid in sids:
        api.step(sid, text="!")
    text = api.metrics().text
    for sid in sids:
        assert sid not in text, "a session id appears in /metrics"
    fam = api.metrics().family("request", kind="counter")
    routes = {v for s in fam.samples for k, v in s.labels.items() if "route" in k or "path" in k}
    assert any("step" in r for r in routes), routes
    assert any("{" in r for r in routes if "step" in r), routes  # the template, not the URL
    models = {s.labels.get("model") for f in api.metrics().families for s in f.samples}
    assert "tinylstm" in models


def test_token_counters_count_exactly(api):
    sid = api.create_session("tinygru")["session_id"]
    before = api.metrics()
    api.step(sid, text="seven b")  # 7 bytes in
    mid = api.metrics()
    consumed = (mid.total("token", "consum", kind="counter", model="tinygru")
                - before.total("token", "consum", kind="counter", model="tinygru"))
    assert consumed == len(encode("seven b")), consumed
    api.generate(sid, max_tokens=11, seed=2)
    after = api.metrics()
    generated = (after.total("token", "generat", kind="counter", model="tinygru")
                 - mid.total("token", "generat", kind="counter", model="tinygru"))
    assert generated == 11, generated


def test_session_gauges_and_counters_move(api):
    m0 = api.metrics()
    sid = api.create_session("tinylstm")["session_id"]
    m1 = api.metrics()
    assert m1.total("session", "created") - m0.total("session", "created") == 1
    assert m1.total("session", "active", kind="gauge") - m0.total(
        "session", "active", kind="gauge") == 1
    assert api.http.delete(f"/v1/sessions/{sid}").status_code == 204
    m2 = api.metrics()
    assert m2.total("session", "active", kind="gauge") == m0.total(
        "session", "active", kind="gauge")
