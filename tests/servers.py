"""Test servers on 127.0.0.1: `running` serves an aiohttp app from a thread; `DatasetHub` stands in for
the Hugging Face Hub's dataset routes (revision info, recursive tree, resolve with HTTP ranges), the
ones eval.heldout_data calls through huggingface_hub. Everything in memory; every request recorded."""
import asyncio
import hashlib
import io
import os
import re
import threading
from contextlib import contextmanager

from aiohttp import web


@contextmanager
def running(app: web.Application):
    """Serve `app` on 127.0.0.1 from a thread; yields the port."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, shutdown_timeout=0.2)

    async def start():
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner.addresses[0][1]

    port = loop.run_until_complete(start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.close()


def parquet_bytes(columns: dict, row_group_size: int) -> bytes:
    """A parquet file holding `columns` (name -> list of values) in row groups of row_group_size rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf, row_group_size=row_group_size)
    return buf.getvalue()


class DatasetHub:
    """Dataset repositories with commits; `requests` lists (path, Range header) of every request and
    `served` the bytes of file content sent, so a test can check what a reader fetched."""

    def __init__(self):
        self.repos = {}      # repo_id -> {"refs": {name: sha}, "commits": {sha: {path: bytes}}}
        self.requests = []
        self.served = 0
        app = web.Application()
        app.router.add_get("/api/datasets/{owner}/{name}/revision/{rev}", self.info)
        app.router.add_get("/api/datasets/{owner}/{name}/tree/{rev}", self.tree)
        app.router.add_get("/api/datasets/{owner}/{name}/tree/{rev}/{path:.*}", self.tree)
        app.router.add_get("/datasets/{owner}/{name}/resolve/{rev}/{path:.*}", self.resolve)
        self.app = app

    def add_commit(self, repo_id: str, files: dict, branch: str = "main") -> str:
        repo = self.repos.setdefault(repo_id, {"refs": {}, "commits": {}})
        sha = hashlib.sha1(repr(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items())).encode()
                           + os.urandom(8)).hexdigest()
        repo["commits"][sha] = dict(files)
        repo["refs"][branch] = sha
        return sha

    def _files(self, request):
        self.requests.append((request.path, request.headers.get("Range")))
        repo = self.repos.get(f"{request.match_info['owner']}/{request.match_info['name']}")
        if repo is None:
            raise web.HTTPNotFound(headers={"X-Error-Code": "RepoNotFound"}, text="Repository not found")
        rev = request.match_info["rev"]
        sha = repo["refs"].get(rev, rev)
        if sha not in repo["commits"]:
            raise web.HTTPNotFound(headers={"X-Error-Code": "RevisionNotFound"}, text=f"Invalid rev id: {rev}")
        return sha, repo["commits"][sha]

    async def info(self, request):
        sha, files = self._files(request)
        return web.json_response({"id": f"{request.match_info['owner']}/{request.match_info['name']}", "sha": sha,
                                  "siblings": [{"rfilename": p} for p in sorted(files)]})

    async def tree(self, request):
        _, files = self._files(request)
        under = request.match_info.get("path", "")
        out = []
        for p, data in sorted(files.items()):
            if under and not p.startswith(under.rstrip("/") + "/"):
                continue
            entry = {"type": "file", "path": p, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
            if p.endswith(".parquet"):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            out.append(entry)
        return web.json_response(out)

    async def resolve(self, request):
        _, files = self._files(request)
        data = files.get(request.match_info["path"])
        if data is None:
            raise web.HTTPNotFound(headers={"X-Error-Code": "EntryNotFound"})
        rng = request.headers.get("Range")
        if rng is None:
            self.served += len(data)
            return web.Response(body=data)
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng)
        start = int(m.group(1))
        end = min(len(data) - 1, int(m.group(2)) if m.group(2) else len(data) - 1)
        body = data[start:end + 1]
        self.served += len(body)
        return web.Response(status=206, body=body,
                            headers={"Content-Range": f"bytes {start}-{end}/{len(data)}"})
