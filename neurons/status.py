"""The validator's status endpoint: `/health`, `/leaderboard` (JSON), `/metrics` (Prometheus) and `/` (a
small HTML page).

It reads the state file only (its own SQLite connection, in its own thread), so a slow page load
can never stall a round, and a round can never serve a half-written leaderboard: every figure
comes from committed transactions.

The HTML page is static; it fetches `/leaderboard` and renders the table in the browser, so the
JSON is the single source of truth and the page has nothing to keep in sync.
"""
from __future__ import annotations

import time

from aiohttp import web

from neurons.chain import MAX_COMMITMENT_BYTES
from neurons.metrics import BackgroundApp, Registry, metrics_handler
from neurons.state import PHASES, ValidatorState

# The page lists the latest rejections only: every hotkey can commit again each block, and a list
# of all of them would grow with every commitment ever made.
REJECTIONS_PER_HOTKEY = 3
MAX_REJECTIONS = 200
MAX_REASON_CHARS = 300


def shown(text: str, limit: int) -> str:
    """`text` as printable ASCII, at most `limit` characters. Hotkeys, commitments and reasons can
    carry bytes a miner chose (a commitment that failed its grammar, a tensor name); the page
    shows no more of them than the commitment grammar itself allows."""
    clean = "".join(ch if " " <= ch <= "~" else "?" for ch in text[:limit])
    return clean + ("..." if len(text) > limit else "")


def leaderboard(state: ValidatorState) -> dict:
    last = state.last_round()
    current = state.unfinished_round()
    rows = []
    if last is not None:
        ema = state.ema()
        sent = state.weights(last.id)
        weights = sent[0] if sent else {}
        for s in state.scores(last.id):
            rows.append({**s, "ema": ema.get(s["hotkey"], 0.0), "weight": weights.get(s["uid"], 0.0),
                         "leader": s["hotkey"] == last.leader})
    rejected = [{"hotkey": shown(s.hotkey, 64), "commitment": shown(s.commitment, MAX_COMMITMENT_BYTES),
                 "stage": shown(s.stage or "", 16), "reason": shown(s.reason or "", MAX_REASON_CHARS)}
                for s in state.recent_rejections(REJECTIONS_PER_HOTKEY, MAX_REJECTIONS)]
    return {
        "round": None if last is None else {"id": last.id, "sync_block": last.sync_block, "seed": last.seed,
                                             "competition": last.competition, "leader": last.leader},
        "in_progress": None if current is None else {"id": current.id, "sync_block": current.sync_block,
                                                     "phase": current.phase},
        "rows": rows,
        "rejected": rejected,
    }


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Quasar SN24 validator</title>
<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td.k{text-align:left;font-family:monospace}
tr.leader{background:#efe}</style></head>
<body><h1>Quasar SN24 leaderboard</h1><p id="round">loading…</p>
<table id="board"><thead><tr><th>rank</th><th>uid</th><th>hotkey</th><th>composite</th><th>gate</th>
<th>EMA</th><th>weight</th></tr></thead><tbody></tbody></table>
<h2>Rejected submissions</h2><ul id="rejected"></ul>
<script>
function cell(tr, text, cls) { const td = document.createElement("td"); td.textContent = text;
  if (cls) td.className = cls; tr.appendChild(td); }
fetch("/leaderboard").then(r => r.json()).then(d => {
  document.getElementById("round").textContent = d.round
    ? `round ${d.round.id} at block ${d.round.sync_block}, leader ${d.round.leader || "none"}`
    : "no finished round yet";
  const body = document.querySelector("#board tbody");
  for (const r of d.rows) { const tr = document.createElement("tr"); if (r.leader) tr.className = "leader";
    cell(tr, r.rank); cell(tr, r.uid); cell(tr, r.hotkey, "k"); cell(tr, r.composite.toFixed(4));
    cell(tr, r.gate || ""); cell(tr, r.ema.toFixed(4)); cell(tr, r.weight.toFixed(4)); body.appendChild(tr); }
  const ul = document.getElementById("rejected");
  for (const r of d.rejected) { const li = document.createElement("li");
    li.textContent = `${r.hotkey}: [${r.stage}] ${r.reason}`; ul.appendChild(li); }
  document.body.dataset.ready = "1";
});
</script></body></html>
"""


def state_metrics(state: ValidatorState) -> Registry:
    """What the state file says, as metrics: the round and its phase, the latest scores, EMA and
    weights per hotkey, and every rejection so far by stage."""
    reg = Registry()
    last, current = state.last_round(), state.unfinished_round()
    reg.gauge("quasar_validator_round", "id of the latest finished round (0: none yet)").set(last.id if last else 0)
    reg.gauge("quasar_validator_round_sync_block", "sync block of the latest finished round").set(
        last.sync_block if last else 0)
    phase = reg.gauge("quasar_validator_phase", "1 for the phase the round in progress is in (done: none in progress)")
    for p in PHASES:
        phase.set(1 if (current.phase if current else "done") == p else 0, phase=p)
    reg.gauge("quasar_validator_round_in_progress", "id of the round in progress (0: none)").set(
        current.id if current else 0)
    score = reg.gauge("quasar_validator_score", "composite score of each hotkey in the latest finished round")
    rank = reg.gauge("quasar_validator_rank", "rank of each hotkey in the latest finished round (1: leader)")
    ema = reg.gauge("quasar_validator_ema", "score EMA of each hotkey")
    weight = reg.gauge("quasar_validator_weight", "weight this validator set on each uid in the latest finished round")
    if last is not None:
        hotkey_of = {}
        for s in state.scores(last.id):
            labels = dict(hotkey=shown(s["hotkey"], 64), uid="" if s["uid"] is None else s["uid"])
            hotkey_of[s["uid"]] = labels["hotkey"]
            score.set(s["composite"], **labels)
            rank.set(s["rank"], **labels)
        sent = state.weights(last.id)
        for uid, w in (sent[0] if sent and sent[1] else {}).items():  # accepted by the chain only
            weight.set(w, uid=uid, hotkey=hotkey_of.get(uid, ""))
    for hotkey, value in state.ema().items():
        ema.set(value, hotkey=shown(hotkey, 64))
    rejections = reg.counter("quasar_validator_rejections_total", "submissions rejected, by the stage that rejected them")
    for stage, n in state.rejections_by_stage().items():
        rejections.inc(n, stage=shown(stage or "", 16))
    return reg


def make_app(state: ValidatorState, started: float | None = None, metrics: Registry | None = None) -> web.Application:
    started = time.time() if started is None else started

    async def health(request):
        last = state.last_round()
        return web.json_response({"status": "ok", "uptime_s": round(time.time() - started, 1),
                                  "last_round": None if last is None else last.id})

    async def board(request):
        return web.json_response(leaderboard(state))

    async def page(request):
        return web.Response(text=PAGE, content_type="text/html")

    def render() -> str:
        return state_metrics(state).render() + (metrics.render() if metrics is not None else "")

    app = web.Application()
    app.router.add_get("/metrics", metrics_handler(render))
    app.router.add_get("/health", health)
    app.router.add_get("/leaderboard", board)
    app.router.add_get("/", page)
    return app


class StatusServer(BackgroundApp):
    """The status app (its own ValidatorState connection, in its own thread); `metrics` is the
    validator's in-process Registry (durations), rendered after what the state holds."""

    def __init__(self, state_path, host: str = "127.0.0.1", port: int = 0, metrics: Registry | None = None):
        self.state_path = state_path
        super().__init__(lambda: make_app(ValidatorState(state_path), metrics=metrics), host, port, name="status")
