"""Storage kinds: publish and fetch round trips, the miner's server, and hostile submissions.

Every server is a real aiohttp server on 127.0.0.1 running in a thread: the miner's
CheckpointServer, a rogue server that answers whatever a test scripts, and a stand-in for the
Hugging Face Hub's HTTP API. Each rejection must carry a reason, and leave nothing on disk.
"""
import asyncio
import base64
import hashlib
import http.client
import json
import os
import socket
import time
from contextlib import contextmanager

import pytest
import torch
from aiohttp import web
from bittensor import http_auth
from bittensor.sp_core import Keypair

from neurons.commitment import Commitment, encode_commitment, parse_commitment
from neurons.manifest import ManifestEntry, SubmissionRejected, compute_model_hash, read_manifest, write_manifest
from neurons.serve import CheckpointServer
from neurons.storage import fetch, fetch_submission, publish, release, stage
from neurons.storage.core import FetchLimits
from quasar_model import QuasarLongConfig, QuasarLongForCausalLM
from servers import running  # noqa: F401 (other tests import it from here)
from test_submissions import LIMITS, WEIGHTS, edit_config, edit_weights

VALIDATOR = Keypair.create_from_uri("//Alice")
OTHER_VALIDATOR = Keypair.create_from_uri("//Charlie")
MINER = Keypair.create_from_uri("//Bob")
STRANGER = Keypair.create_from_uri("//Eve")
HK = MINER.ss58_address  # the committing hotkey, which every commitment binds its model to
VALIDATORS = {VALIDATOR.ss58_address, OTHER_VALIDATOR.ss58_address}
FAST = FetchLimits(LIMITS, connect_timeout=2, read_timeout=5, request_timeout=10, total_timeout=20)


@pytest.fixture
def server():
    with CheckpointServer(MINER.ss58_address, VALIDATORS.__contains__) as s:
        yield s


def tree(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@contextmanager
def leaves_no_trace(tmp_path):
    """Whatever happens inside, no path under tmp_path appears or disappears."""
    before = tree(tmp_path)
    yield
    assert tree(tmp_path) == before


def rejected_fetch(tmp_path, commitment, stage, *words, **kwargs) -> SubmissionRejected:
    kwargs.setdefault("limits", FAST)
    kwargs.setdefault("miner_hotkey", HK)
    with leaves_no_trace(tmp_path), pytest.raises(SubmissionRejected) as info:
        fetch(commitment, tmp_path / "dest", **kwargs)
    err = info.value
    assert err.stage == stage, err
    for word in words:
        assert word in err.reason, (word, err.reason)
    return err


def assert_same_files(a, b):
    assert sorted(os.listdir(a)) == sorted(os.listdir(b))
    for name in os.listdir(a):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


# ================================================================================ round trips
def test_local_round_trip(ckpt, tmp_path):
    root = tmp_path / "storage"
    c = publish(ckpt, "local", hotkey=HK, storage_root=root, location="miners/m1")
    assert parse_commitment(encode_commitment(c), localnet=True) == c
    # the token is the binding's: it reveals nothing of the model hash the commitment does not
    assert c.revision == c.binding[:16] and read_manifest(ckpt).model_hash[:8] not in encode_commitment(c)
    assert publish(ckpt, "local", hotkey=HK, storage_root=root, location="miners/m1") == c  # idempotent
    got = fetch(c, tmp_path / "dest", limits=FAST, miner_hotkey=HK, storage_root=root, localnet=True)
    assert_same_files(got, ckpt)
    with pytest.raises(SubmissionRejected, match="localnet only"):  # mainnet never reads local paths
        fetch(c, tmp_path / "dest2", limits=FAST, miner_hotkey=HK, storage_root=root)


def test_http_round_trip(ckpt, tmp_path, server):
    c = publish(ckpt, "http", hotkey=HK, server=server)
    assert (c.kind, c.location) == ("http", f"127.0.0.1:{server.port}")
    got = fetch_submission(encode_commitment(c), tmp_path / "dest", limits=FAST, keypair=VALIDATOR,
                           miner_hotkey=MINER.ss58_address, localnet=True)  # the string, as read from chain
    assert_same_files(got.directory, ckpt)
    assert got.submission.summary.model_hash == read_manifest(ckpt).model_hash


def test_staged_checkpoints_are_unreadable_until_released(ckpt, tmp_path, server):
    """A miner commits between `stage` and `release`: before the release no validator can fetch
    the weights, so nobody can copy them into the block its commitment lands in."""
    root = tmp_path / "storage"
    c = stage(ckpt, "local", hotkey=HK, storage_root=root, location="miners/m1")
    rejected_fetch(tmp_path, c, "fetch", storage_root=root, localnet=True)
    release(c, ckpt, storage_root=root)
    release(c, ckpt, storage_root=root)  # idempotent: a miner restarted mid-way releases again
    assert_same_files(fetch(c, tmp_path / "local", limits=FAST, miner_hotkey=HK, storage_root=root,
                            localnet=True), ckpt)
    h = stage(ckpt, "http", hotkey=HK, server=server)
    rejected_fetch(tmp_path, h, "fetch", "404", keypair=VALIDATOR, localnet=True)
    release(h, ckpt, server=server)
    got = fetch_submission(h, tmp_path / "dest2", limits=FAST, keypair=VALIDATOR, miner_hotkey=HK, localnet=True)
    assert got.submission.summary.model_hash == read_manifest(ckpt).model_hash


def test_fetch_refuses_a_non_empty_destination(ckpt, tmp_path):
    c = publish(ckpt, "local", hotkey=HK, storage_root=tmp_path / "s", location="m")
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        fetch(c, tmp_path / "dest", limits=FAST, miner_hotkey=HK, storage_root=tmp_path / "s", localnet=True)
    assert (tmp_path / "dest" / "mine.txt").read_text() == "keep me"


# ================================================================================ the miner's server
def get(server, path, headers=None, method="GET"):
    """(status, body, headers). `headers` may be a list of pairs, to repeat a header."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for key, value in (headers.items() if isinstance(headers, dict) else headers or []):
            conn.putheader(key, value)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read(), dict(response.getheaders())
    finally:
        conn.close()


def signed(path, key=VALIDATOR, receiver=MINER.ss58_address, **kwargs):
    return http_auth.sign(key, method="GET", path=path, receiver_ss58=receiver, **kwargs)


@pytest.fixture
def served(ckpt, server):
    server.register("tok1", ckpt)
    return "/checkpoint/tok1/"


def test_server_serves_signed_requests(served, server, ckpt):
    status, body, headers = get(server, served + WEIGHTS, signed(served + WEIGHTS))
    assert status == 200 and body == (ckpt / WEIGHTS).read_bytes()
    status, body, _ = get(server, served + "manifest.json", signed(served + "manifest.json"))
    assert status == 200 and body == (ckpt / "manifest.json").read_bytes()


def test_server_refuses_forged_stale_replayed_and_strangers(served, server):
    path = served + "config.json"
    cases = {
        "unsigned": ({}, 401, "not signed"),
        "forged": ({**signed(path, key=STRANGER), http_auth.HEADER_HOTKEY: VALIDATOR.ss58_address}, 401, "signature"),
        "other path": (signed(served + WEIGHTS), 401, "signature"),
        "stale": (signed(path, nonce_ns=time.time_ns() - 60 * 10**9), 401, "older"),
        "future": (signed(path, nonce_ns=time.time_ns() + 60 * 10**9), 401, "future"),
        "wrong receiver": (signed(path, receiver=STRANGER.ss58_address), 403, "receiving hotkey"),
        "stranger": (signed(path, key=STRANGER), 403, "not a registered validator"),
    }
    for label, (headers, status, words) in cases.items():
        got, body, _ = get(server, path, headers)
        assert (got, words in body.decode()) == (status, True), (label, got, body)
    headers = signed(path)
    assert get(server, path, headers)[0] == 200
    status, body, _ = get(server, path, headers)  # the very same request again
    assert status == 401 and b"already accepted" in body


def test_server_refuses_repeated_auth_headers(served, server):
    """A stranger's valid signature with a validator's hotkey slipped in as a first, extra copy."""
    path = served + "config.json"
    headers = [(http_auth.HEADER_HOTKEY, VALIDATOR.ss58_address), *signed(path, key=STRANGER).items()]
    status, body, _ = get(server, path, headers)
    assert status == 400 and b"repeated" in body


def test_server_fails_closed_when_the_validator_list_fails(ckpt):
    def broken(hotkey):
        raise RuntimeError("metagraph sync failed")

    with CheckpointServer(MINER.ss58_address, broken) as s:
        s.register("tok1", ckpt)
        path = "/checkpoint/tok1/config.json"
        assert get(s, path, signed(path))[0] == 503


def test_server_rate_limits_per_hotkey(ckpt):
    with CheckpointServer(MINER.ss58_address, VALIDATORS.__contains__, burst=3, requests_per_second=0.01) as s:
        s.register("tok1", ckpt)
        path = "/checkpoint/tok1/config.json"
        assert [get(s, path, signed(path))[0] for _ in range(3)] == [200] * 3
        status, body, headers = get(s, path, signed(path))
        assert status == 429 and b"rate limit" in body and int(headers["Retry-After"]) >= 1
        assert get(s, path, signed(path, key=OTHER_VALIDATOR))[0] == 200  # buckets are per hotkey


def test_server_has_no_listing_and_serves_only_the_manifest(served, server, ckpt):
    (ckpt / "secret.txt").write_text("not published")
    for path in (served, served[:-1], "/checkpoint/", "/", served + "secret.txt", served + "..%2Fsecret.txt",
                 "/checkpoint/tok2/config.json", "/checkpoint/tok1/../tok1/config.json"):
        status, body, _ = get(server, path, signed(path))
        assert status == 404 and b"not published" not in body, (path, status, body)
    assert get(server, served + "config.json", signed(served + "config.json", ), method="POST")[0] == 405


def test_server_refuses_a_file_changed_after_publishing(served, server, ckpt):
    with open(ckpt / "config.json", "a") as f:
        f.write(" ")
    status, body, _ = get(server, served + "config.json", signed(served + "config.json"))
    assert status == 410 and b"changed" in body


def test_server_refuses_to_register_a_bad_checkpoint(ckpt, server):
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04.")
    with pytest.raises(SubmissionRejected, match="pickle"):
        server.register("tok1", ckpt)
    with pytest.raises(ValueError, match="token"):
        server.register("../x", ckpt)


# ================================================================================ hostile over http
def fetch_http(tmp_path, ckpt, server, stage, *words, limits=FAST):
    c = publish(ckpt, "http", hotkey=HK, server=server)
    return rejected_fetch(tmp_path, c, stage, *words, limits=limits, keypair=VALIDATOR,
                          miner_hotkey=MINER.ss58_address, localnet=True)


def test_nan_weights_rejected(ckpt, tmp_path, server):
    def poison(t):
        t["model.norm.weight"][3] = float("nan")
    edit_weights(ckpt, poison)
    fetch_http(tmp_path, ckpt, server, "weights", "model.norm.weight", "NaN")


@pytest.mark.parametrize("changes,word", [
    ({"vocab_size": 10**9}, "vocab_size"),
    ({"num_hidden_layers": 10**6}, "num_hidden_layers"),
    ({"model_type": "llama"}, "model_type"),
    ({"architectures": ["LlamaForCausalLM"]}, "architectures"),
])
def test_config_bombs_and_wrong_architecture_rejected(ckpt, tmp_path, server, changes, word):
    edit_config(ckpt, **changes)
    start = time.perf_counter()
    fetch_http(tmp_path, ckpt, server, "config", word)
    assert time.perf_counter() - start < 5


def test_fetch_by_a_stranger_is_refused(ckpt, tmp_path, server):
    c = publish(ckpt, "http", hotkey=HK, server=server)
    err = rejected_fetch(tmp_path, c, "fetch", "HTTP 403", keypair=STRANGER, miner_hotkey=MINER.ss58_address,
                         localnet=True)
    assert "registered" not in err.reason  # the server's body is not repeated in a stored reason


def test_resolved_private_address_refused_off_localnet(ckpt, tmp_path, monkeypatch):
    real = socket.getaddrinfo

    def fake(host, *args, **kwargs):  # a public-looking name that resolves into the validator's network
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.5", 80))] if host == "miner.example.org" \
            else real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    c = Commitment("http", "miner.example.org:8091", "tok", "0" * 32)
    rejected_fetch(tmp_path, c, "fetch", "10.0.0.5", "not a public address", keypair=VALIDATOR,
                   miner_hotkey=MINER.ss58_address)
    rejected_fetch(tmp_path, Commitment("http", "127.0.0.1:8091", "tok", "0" * 32), "commitment",
                   "not a public address", keypair=VALIDATOR, miner_hotkey=MINER.ss58_address)


# ================================================================================ hostile: rogue server
class Rogue:
    """Answers /checkpoint/t/{name} from `files` (bytes or an async handler); ignores signatures."""

    def __init__(self, files):
        self.files = files
        app = web.Application()
        app.router.add_get("/checkpoint/t/{name}", self.handle)
        self.app = app

    async def handle(self, request):
        value = self.files.get(request.match_info["name"])
        if value is None:
            return web.Response(status=404)
        if callable(value):
            return await value(request)
        return web.Response(body=value)


def manifest_bytes(entries):
    entries = [ManifestEntry(*e) for e in entries]
    body = {"version": 1, "model_hash": compute_model_hash(entries),
            "files": [{"name": e.name, "size": e.size, "sha256": e.sha256} for e in entries]}
    return json.dumps(body).encode(), body["model_hash"]


def rogue_fetch(tmp_path, files, model_hash, stage, *words, limits=FAST):
    with running(Rogue(files).app) as port:
        c = Commitment.for_model("http", f"127.0.0.1:{port}", "t", model_hash, HK)
        return rejected_fetch(tmp_path, c, stage, *words, limits=limits, keypair=VALIDATOR,
                              miner_hotkey=MINER.ss58_address, localnet=True)


def real_files(ckpt):
    return {name: (ckpt / name).read_bytes() for name in os.listdir(ckpt)}


@pytest.mark.parametrize("name,words", [
    ("pytorch_model.bin", ["pytorch_model.bin", "pickle"]),
    ("modeling_quasar.py", ["modeling_quasar.py", "code"]),
    ("../evil.json", ["traversal"]),
    ("/tmp/evil.json", ["traversal"]),
])
def test_forbidden_names_rejected_before_download(ckpt, tmp_path, name, words):
    payload = b"cos\nsystem\n(S'touch /tmp/pwned'\ntR."
    entries = [(e.name, e.size, e.sha256) for e in read_manifest(ckpt).files]
    raw, model_hash = manifest_bytes([*entries, (name, len(payload), hashlib.sha256(payload).hexdigest())])
    files = {**real_files(ckpt), "manifest.json": raw, name.split("/")[-1]: payload}
    rogue_fetch(tmp_path, files, model_hash, "manifest", *words)
    assert not (tmp_path / "evil.json").exists()


def test_sha256_mismatch_rejected(ckpt, tmp_path):
    files = real_files(ckpt)
    data = bytearray(files[WEIGHTS])
    data[len(data) // 2] ^= 1
    files[WEIGHTS] = bytes(data)
    rogue_fetch(tmp_path, files, read_manifest(ckpt).model_hash, "manifest", WEIGHTS, "sha256 mismatch")


def test_uncommitted_manifest_rejected_before_weights(ckpt, tmp_path):
    files = real_files(ckpt)
    asked = []

    async def weights(request):
        asked.append(1)
        return web.Response(body=files[WEIGHTS])

    rogue_fetch(tmp_path, {**files, WEIGHTS: weights}, "f" * 64, "manifest", "not the committed")
    assert not asked


async def endless(request):
    """Chunked, no Content-Length, never ends."""
    response = web.StreamResponse()
    await response.prepare(request)
    while True:
        await response.write(b"\0" * 65536)
        await asyncio.sleep(0)


def test_oversize_stopped_mid_stream(ckpt, tmp_path):
    rogue_fetch(tmp_path, {**real_files(ckpt), WEIGHTS: endless}, read_manifest(ckpt).model_hash,
                "fetch", WEIGHTS, "runs past")


def test_oversize_manifest_and_declared_total_rejected(ckpt, tmp_path):
    rogue_fetch(tmp_path, {"manifest.json": endless}, "0" * 64, "fetch", "manifest.json", "runs past")
    small = FetchLimits(LIMITS, max_total_bytes=1 << 20, request_timeout=10, total_timeout=20)
    rogue_fetch(tmp_path, real_files(ckpt), read_manifest(ckpt).model_hash, "fetch", "declares", limits=small)


def test_announced_oversize_and_truncation_rejected(ckpt, tmp_path):
    files = real_files(ckpt)
    rogue_fetch(tmp_path, {**files, WEIGHTS: files[WEIGHTS] + b"x"}, read_manifest(ckpt).model_hash,
                "fetch", WEIGHTS, "announced")
    rogue_fetch(tmp_path, {**files, WEIGHTS: files[WEIGHTS][:-1]}, read_manifest(ckpt).model_hash,
                "fetch", WEIGHTS, "truncated")


async def trickle(request):
    """One byte every 50 ms, forever: never silent long enough for a read timeout."""
    response = web.StreamResponse()
    await response.prepare(request)
    while True:
        await response.write(b"\0")
        await asyncio.sleep(0.05)


async def silent(request):
    response = web.StreamResponse()
    await response.prepare(request)
    await asyncio.sleep(3600)


@pytest.mark.parametrize("handler,limits,words", [
    (trickle, FetchLimits(LIMITS, read_timeout=5, request_timeout=1, total_timeout=20), ["per-request limit"]),
    (trickle, FetchLimits(LIMITS, read_timeout=5, request_timeout=10, total_timeout=1), ["total limit"]),
    (silent, FetchLimits(LIMITS, read_timeout=0.5, request_timeout=10, total_timeout=20), ["waiting 0.5s"]),
])
def test_download_that_never_ends_fails_on_time(ckpt, tmp_path, handler, limits, words):
    start = time.perf_counter()
    rogue_fetch(tmp_path, {**real_files(ckpt), WEIGHTS: handler}, read_manifest(ckpt).model_hash,
                "fetch", *words, limits=limits)
    assert time.perf_counter() - start < 3


def test_redirect_refused(ckpt, tmp_path):
    async def redirect(request):
        raise web.HTTPFound("http://169.254.169.254/latest/meta-data")

    rogue_fetch(tmp_path, {"manifest.json": redirect}, "0" * 64, "fetch", "redirect")


# ================================================================================ hostile: local storage
def test_local_pickle_beside_the_checkpoint_rejected(ckpt, tmp_path):
    root = tmp_path / "storage"
    c = publish(ckpt, "local", hotkey=HK, storage_root=root, location="miners/m1")
    (root / "miners/m1" / c.revision / "pytorch_model.bin").write_bytes(b"\x80\x04.")
    rejected_fetch(tmp_path, c, "manifest", "pickle", storage_root=root, localnet=True)


def test_local_symlink_out_of_the_root_rejected(ckpt, tmp_path):
    root = tmp_path / "storage"
    (root / "miners").mkdir(parents=True)
    os.symlink(ckpt.parent, root / "miners" / "evil")  # points outside the root
    c = Commitment.for_model("local", "miners/evil", "ckpt", read_manifest(ckpt).model_hash, HK)
    rejected_fetch(tmp_path, c, "fetch", "outside the storage root", storage_root=root, localnet=True)
    with leaves_no_trace(tmp_path), pytest.raises(ValueError, match="leaves the storage root"):
        publish(ckpt, "local", hotkey=HK, storage_root=root, location="miners/evil/sub")


# ================================================================================ hf: a stand-in Hub
class FakeHub:
    """The Hub endpoints huggingface_hub's create_repo, update_repo_settings, model_info and
    create_commit call, and the resolve URLs; large files redirect to a CDN path as on the real Hub.
    A private repo answers 404 to requests without a token, as the Hub does. Everything in memory."""

    def __init__(self):
        self.repos = {}  # repo_id -> {"main": sha, "commits": {sha: {name: bytes}}, "private": bool}
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/api/repos/create", self.create)
        app.router.add_put("/api/models/{owner}/{name}/settings", self.settings)
        app.router.add_get("/api/models/{owner}/{name}/revision/{rev}", self.info)
        app.router.add_post("/api/models/{owner}/{name}/preupload/{rev}", self.preupload)
        app.router.add_post("/api/models/{owner}/{name}/commit/{rev}", self.commit)
        app.router.add_get("/{owner}/{name}/resolve/{rev}/{file}", self.resolve)
        app.router.add_get("/cdn/{sha256}", self.cdn)
        self.app = app

    def add_commit(self, repo_id, files):
        sha = hashlib.sha1(repr(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items())).encode()
                           + os.urandom(8)).hexdigest()
        self.repos[repo_id]["commits"][sha] = dict(files)
        self.repos[repo_id]["main"] = sha
        return sha

    def files_at(self, request):
        repo = self.repos.get(f"{request.match_info['owner']}/{request.match_info['name']}")
        if repo is None or (repo["private"] and "authorization" not in request.headers):
            raise web.HTTPNotFound(headers={"X-Error-Code": "RepoNotFound"})
        rev = request.match_info["rev"]
        sha = repo["main"] if rev == "main" else rev
        if sha not in repo["commits"]:
            raise web.HTTPNotFound(headers={"X-Error-Code": "RevisionNotFound"})
        return sha, repo["commits"][sha]

    async def create(self, request):
        body = await request.json()
        repo_id = f"{body['organization']}/{body['name']}"
        if repo_id in self.repos:
            return web.json_response({"error": "You already created this model repo",
                                      "url": f"http://{request.host}/{repo_id}"}, status=409)
        self.repos[repo_id] = {"commits": {}, "private": body.get("visibility") == "private" or bool(body.get("private"))}
        self.add_commit(repo_id, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
        return web.json_response({"url": f"http://{request.host}/{repo_id}"})

    async def settings(self, request):
        repo = self.repos.get(f"{request.match_info['owner']}/{request.match_info['name']}")
        if repo is None or "authorization" not in request.headers:  # only its owner may change it
            raise web.HTTPNotFound(headers={"X-Error-Code": "RepoNotFound"})
        repo["private"] = (await request.json())["visibility"] == "private"
        return web.json_response({})

    async def info(self, request):
        sha, files = self.files_at(request)
        siblings = []
        for name, data in sorted(files.items()):
            entry = {"rfilename": name, "size": len(data), "blobId": hashlib.sha1(data).hexdigest()}
            if name.endswith(".safetensors"):
                entry["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
            siblings.append(entry)
        return web.json_response({"id": f"{request.match_info['owner']}/{request.match_info['name']}",
                                  "sha": sha, "siblings": siblings})

    async def preupload(self, request):
        body = await request.json()
        return web.json_response({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                            for f in body["files"]]})

    async def commit(self, request):
        _, files = self.files_at(request)
        files = dict(files)
        for line in (await request.read()).splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] == "deletedFile":
                files.pop(item["value"]["path"])
            elif item["key"] != "header":
                return web.json_response({"error": f"unsupported {item['key']}"}, status=400)
        repo_id = f"{request.match_info['owner']}/{request.match_info['name']}"
        sha = self.add_commit(repo_id, files)
        return web.json_response({"commitUrl": f"http://{request.host}/{repo_id}/commit/{sha}", "commitOid": sha})

    async def resolve(self, request):
        _, files = self.files_at(request)
        data = files.get(request.match_info["file"])
        if data is None:
            raise web.HTTPNotFound(headers={"X-Error-Code": "EntryNotFound"})
        if request.match_info["file"].endswith(".safetensors"):
            raise web.HTTPFound(f"/cdn/{hashlib.sha256(data).hexdigest()}")
        return web.Response(body=data)

    async def cdn(self, request):
        for repo in self.repos.values():
            if repo["private"] and "authorization" not in request.headers:
                continue
            for files in repo["commits"].values():
                for data in files.values():
                    if hashlib.sha256(data).hexdigest() == request.match_info["sha256"]:
                        return web.Response(body=data)
        raise web.HTTPNotFound()


@pytest.fixture
def hub():
    fake = FakeHub()
    with running(fake.app) as port:
        fake.endpoint = f"http://127.0.0.1:{port}"
        yield fake


def test_hf_round_trip_pins_the_revision(ckpt, tmp_path, hub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)  # as a validator would point at a mirror
    c = publish(ckpt, "hf", hotkey=HK, repo_id="miner/student", hf_token="owner")
    assert c.kind == "hf" and len(c.revision) == 40 and c.revision == hub.repos["miner/student"]["main"]
    got = fetch(c, tmp_path / "dest", limits=FAST, miner_hotkey=HK)
    assert_same_files(got, ckpt)
    # A second checkpoint with a different file set: the stale shard is deleted from the new
    # revision, and the first commitment still fetches its own, pinned revision.
    torch.manual_seed(1)
    second = tmp_path / "second"
    QuasarLongForCausalLM(QuasarLongConfig.preset("tiny")).save_pretrained(second, max_shard_size="1MB")
    c2 = publish(second, "hf", hotkey=HK, repo_id="miner/student", hf_token="owner",
                 hf_endpoint=hub.endpoint)
    assert c2.revision != c.revision and WEIGHTS not in hub.repos["miner/student"]["commits"][c2.revision]
    assert_same_files(fetch(c2, tmp_path / "dest2", limits=FAST, miner_hotkey=HK, hf_endpoint=hub.endpoint), second)
    assert_same_files(fetch(c, tmp_path / "dest3", limits=FAST, miner_hotkey=HK, hf_endpoint=hub.endpoint), ckpt)


def test_hf_repo_stays_private_until_released(ckpt, tmp_path, hub):
    # an existing public repo is made private before the new checkpoint goes up
    publish(ckpt, "hf", hotkey=HK, repo_id="miner/student", hf_token="owner", hf_endpoint=hub.endpoint)
    assert hub.repos["miner/student"]["private"] is False
    torch.manual_seed(3)
    second = tmp_path / "second"
    QuasarLongForCausalLM(QuasarLongConfig.preset("tiny")).save_pretrained(second)
    c = stage(second, "hf", hotkey=HK, repo_id="miner/student", hf_token="owner", hf_endpoint=hub.endpoint)
    assert hub.repos["miner/student"]["private"] is True and c.revision == hub.repos["miner/student"]["main"]
    rejected_fetch(tmp_path, c, "fetch", hf_endpoint=hub.endpoint)
    release(c, second, hf_token="owner", hf_endpoint=hub.endpoint)
    assert hub.repos["miner/student"]["private"] is False
    assert_same_files(fetch(c, tmp_path / "dest", limits=FAST, miner_hotkey=HK, hf_endpoint=hub.endpoint), second)


def test_hf_hostile_repos_rejected(ckpt, tmp_path, hub):
    c = publish(ckpt, "hf", hotkey=HK, repo_id="miner/student", hf_token="owner", hf_endpoint=hub.endpoint)
    files = hub.repos["miner/student"]["commits"][c.revision]
    cases = [
        ({**files, "pytorch_model.bin": b"\x80\x04."}, "manifest", ["pytorch_model.bin", "pickle"]),
        ({**files, "modeling.py": b"import os"}, "manifest", ["code"]),
        ({**files, "vocab.json": b"{}"}, "manifest", ["vocab.json", "not listed"]),
        ({**files, WEIGHTS: files[WEIGHTS][:-1] + b"\1"}, "manifest", ["sha256 mismatch"]),  # caught by the LFS hash
        ({k: v for k, v in files.items() if k != "config.json"}, "manifest", ["config.json", "missing"]),
    ]
    for variant, stage, words in cases:
        sha = hub.add_commit("miner/student", variant)
        bad = Commitment("hf", c.location, sha, c.binding)
        rejected_fetch(tmp_path, bad, stage, *words, hf_endpoint=hub.endpoint)
    unknown = Commitment("hf", c.location, "0" * 40, c.binding)
    rejected_fetch(tmp_path, unknown, "fetch", "metadata request failed", hf_endpoint=hub.endpoint)
