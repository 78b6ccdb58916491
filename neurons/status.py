"""The validator's status endpoint: `/health`, `/leaderboard` (JSON) and `/` (a small HTML page).

It reads the state file only (its own SQLite connection, in its own thread), so a slow page load
can never stall a round, and a round can never serve a half-written leaderboard: every figure
comes from committed transactions.

The HTML page is static; it fetches `/leaderboard` and renders the table in the browser, so the
JSON is the single source of truth and the page has nothing to keep in sync.
"""
from __future__ import annotations

import asyncio
import threading
import time

from aiohttp import web

from neurons.commitment import MAX_COMMITMENT_BYTES
from neurons.state import ValidatorState

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


def make_app(state: ValidatorState, started: float | None = None) -> web.Application:
    started = time.time() if started is None else started

    async def health(request):
        last = state.last_round()
        return web.json_response({"status": "ok", "uptime_s": round(time.time() - started, 1),
                                  "last_round": None if last is None else last.id})

    async def board(request):
        return web.json_response(leaderboard(state))

    async def page(request):
        return web.Response(text=PAGE, content_type="text/html")

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/leaderboard", board)
    app.router.add_get("/", page)
    return app


class StatusServer:
    """Runs the status app on its own event loop in a daemon thread."""

    def __init__(self, state_path, host: str = "127.0.0.1", port: int = 0):
        self.state_path, self.host, self.port = state_path, host, port
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="status-http", daemon=True)
        self._runner: web.AppRunner | None = None
        self._error: BaseException | None = None

    def _run(self):
        asyncio.set_event_loop(self._loop)
        try:
            state = ValidatorState(self.state_path)  # this thread's own connection
            self._runner = web.AppRunner(make_app(state), access_log=None)
            self._loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, self.host, self.port)
            self._loop.run_until_complete(site.start())
            self.port = self._runner.addresses[0][1]
        except BaseException as e:  # surfaced by start()
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())

    def start(self) -> "StatusServer":
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise RuntimeError(f"status server could not listen on {self.host}:{self.port}: {self._error}")
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"
