"""Prometheus /metrics (issue 12): the exposition text neurons.metrics writes, read back by
prometheus_client's own parser, on the validator's status server and the miner's metrics server."""
from __future__ import annotations

import math
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from neurons.metrics import CONTENT_TYPE, BackgroundApp, Registry, metrics_app
from neurons.state import Submission, ValidatorState
from neurons.status import StatusServer


def parsed(text: str) -> dict[str, dict]:
    """family name -> {"type": ..., "samples": {(sample name, sorted labels): value}}."""
    out = {}
    for family in text_string_to_metric_families(text):
        out[family.name] = {"type": family.type, "samples": {
            (s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}}
    return out


def scrape(url: str) -> dict[str, dict]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        assert r.headers["Content-Type"] == CONTENT_TYPE
        return parsed(r.read().decode())


def test_the_exposition_text_parses_with_hostile_label_values():
    reg = Registry()
    g = reg.gauge("quasar_test_value", "a gauge\nwhose help has a newline and a \\ backslash")
    hostile = 'a"b\\c\nd}{,x="y"'
    g.set(1.5, hotkey=hostile)
    g.set(float("nan"), hotkey="nan")
    g.set(float("inf"), hotkey="inf")
    c = reg.counter("quasar_test_events_total", "a counter")
    c.inc(stage="fetch")
    c.inc(2, stage="fetch")
    h = reg.histogram("quasar_test_seconds", "a histogram", buckets=(1, 10))
    for v in (0.5, 3, 30):
        h.observe(v, outcome="ok")
    m = parsed(reg.render())
    assert m["quasar_test_value"]["samples"][("quasar_test_value", (("hotkey", hostile),))] == 1.5
    assert math.isnan(m["quasar_test_value"]["samples"][("quasar_test_value", (("hotkey", "nan"),))])
    assert m["quasar_test_value"]["samples"][("quasar_test_value", (("hotkey", "inf"),))] == math.inf
    # the parser names a counter's family without _total
    assert m["quasar_test_events"] == {"type": "counter", "samples": {
        ("quasar_test_events_total", (("stage", "fetch"),)): 3.0}}
    hist = m["quasar_test_seconds"]
    assert hist["type"] == "histogram"
    buckets = {dict(k[1])["le"]: v for k, v in hist["samples"].items() if k[0].endswith("_bucket")}
    assert buckets == {"1.0": 1, "10.0": 2, "+Inf": 3}  # cumulative
    assert hist["samples"][("quasar_test_seconds_count", (("outcome", "ok"),))] == 3
    assert hist["samples"][("quasar_test_seconds_sum", (("outcome", "ok"),))] == 33.5
    with pytest.raises(ValueError, match="only goes up"):
        c.inc(-1)
    with pytest.raises(ValueError, match="bad label name"):
        g.set(1, **{"bad-name": "x"})
    with pytest.raises(ValueError, match="is a gauge, not a counter"):
        reg._family("quasar_test_value", "", "counter")


def test_validator_status_server_metrics(tmp_path):
    s = ValidatorState(tmp_path / "v.db")
    r = s.open_round(10, "0xab", 5, "digest")
    s.record_submission(r.id, Submission("hkA", "q1:bad", None, 3, "rejected", "commitment", "grammar", None))
    s.record_submission(r.id, Submission("hkC", "q1:c", None, 3, "rejected", "fetch", "timeout", None))
    s.record_submission(r.id, Submission("hkD", "q1:d", None, 3, "rejected", "fetch", "404", None))
    s.record_submission(r.id, Submission("hkB", "q1:good", "m" * 64, 4, "accepted", None, None, "/x"))
    s.save_result(r.id, "hkB", "m" * 64, {"items": [1]})
    s.finish_scoring(r.id, [dict(hotkey="hkB", uid=2, model_hash="m" * 64, composite=0.5, rank=1, axes={}),
                            dict(hotkey="hkE", uid=4, model_hash="e" * 64, composite=0.25, rank=2, axes={})],
                     {"hkB": 0.5, "hkE": 0.1}, "hkB", "m" * 64)
    s.record_weights(r.id, 11, {2: 0.8, 4: 0.2}, True)
    s.open_round(20, "0xcd", 6, "digest")  # the next round, in its fetch phase
    durations = Registry()
    durations.histogram("quasar_validator_eval_seconds", "one evaluation").observe(42.0, outcome="scored")
    srv = StatusServer(tmp_path / "v.db", metrics=durations).start()
    try:
        m = scrape(srv.url)
    finally:
        srv.stop()

    def value(name, family=None, **labels):
        return m[family or name]["samples"][(name, tuple(sorted((k, str(v)) for k, v in labels.items())))]

    assert value("quasar_validator_round") == 1 and value("quasar_validator_round_sync_block") == 10
    assert value("quasar_validator_round_in_progress") == 2
    assert {dict(k[1])["phase"]: v for k, v in m["quasar_validator_phase"]["samples"].items()} == {
        "fetch": 1, "evaluate": 0, "score": 0, "weights": 0, "done": 0}
    assert value("quasar_validator_score", hotkey="hkB", uid=2) == 0.5
    assert value("quasar_validator_rank", hotkey="hkE", uid=4) == 2
    assert value("quasar_validator_weight", hotkey="hkB", uid=2) == 0.8
    assert value("quasar_validator_weight", hotkey="hkE", uid=4) == 0.2
    assert value("quasar_validator_ema", hotkey="hkE") == 0.1
    assert value("quasar_validator_rejections_total", "quasar_validator_rejections", stage="fetch") == 2
    assert value("quasar_validator_rejections_total", "quasar_validator_rejections", stage="commitment") == 1
    assert value("quasar_validator_eval_seconds_sum", "quasar_validator_eval_seconds", outcome="scored") == 42.0


def test_a_metrics_server_that_cannot_bind_says_so(tmp_path):
    reg = Registry()
    first = BackgroundApp(lambda: metrics_app(reg), port=0, name="metrics").start()
    try:
        with pytest.raises(RuntimeError, match=f"metrics server could not listen on 127.0.0.1:{first.port}"):
            BackgroundApp(lambda: metrics_app(reg), port=first.port, name="metrics").start()
    finally:
        first.stop()
