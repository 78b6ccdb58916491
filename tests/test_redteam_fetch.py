"""Red team, storage and fetch (issue 11, attacks 1a, 7 and 8): each attack run against the real
validator on a local chain, with real aiohttp servers on 127.0.0.1 playing the hostile miners.

Every attack ends the same way: the honest miner holds its weight, the attacker gets nothing and
its submission a recorded stage and reason, and the validator finishes its rounds.

The competition turns the degenerate gate off (`degenerate_max_repeat` 1.0): untrained tiny
students loop, and these tests are about storage, not that gate.
"""
import asyncio
import http.client
import json
import shutil
import socket
import threading
import time
from contextlib import ExitStack

import pytest
from aiohttp import web
from bittensor import http_auth

from eval.competition import parse_competition
from neurons.addresses import address_problem
from neurons.commitment import Commitment, encode_commitment
from neurons.fetching import FetchSettings, Job, fetch_round
from neurons.keys import local_keypair
from neurons.manifest import read_manifest, verify_manifest, write_manifest
from neurons.modelstore import ModelStore
from neurons.serve import CheckpointServer
from neurons.state import Submission, ValidatorState
from neurons.status import MAX_REJECTIONS, REJECTIONS_PER_HOTKEY, StatusServer
from neurons.storage import publish
from neurons.storage.core import FetchLimits
from neurons.validator import Validator, ValidatorSettings, student_limits
from test_storage import MINER, VALIDATOR, VALIDATORS, FakeHub, Rogue, real_files, running
from test_validator import Subnet, plant, quick_competition, student

WEIGHTS = "model.safetensors"


def redteam_competition() -> dict:
    raw = quick_competition()  # 2 held-out documents: these rounds check rejections and a sole scorer's weight
    raw["score"]["degenerate_max_repeat"] = 1.0
    return raw


class Net(Subnet):
    def __init__(self, tmp):
        super().__init__(tmp)
        self.competition_path.write_text(json.dumps(redteam_competition()))
        self.competition = parse_competition(redteam_competition())

    def validator_for(self, work, **kw) -> Validator:
        return Validator(self.chain, self.validator, self.competition, self.settings(work, **kw))

    def registered(self, name):
        """The keypair of a miner `key` already registered."""
        return local_keypair(f"{name}-default", self.keys)

    def weight(self, hotkey) -> float:
        weights = self.chain.latest_weights(self.validator.ss58_address) or {}
        return weights.get(self.chain.metagraph().uid_of(hotkey), 0.0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    out = {name: student(d / name, seed) for name, seed in [("a", 1), ("b", 2)]}
    for path in out.values():
        write_manifest(path)
    return out


def rejection(state: ValidatorState, hotkey: str) -> Submission:
    rejected = [s for s in state.submissions("rejected") if s.hotkey == hotkey]
    assert rejected, f"{hotkey} has no recorded rejection"
    assert rejected[-1].stage and rejected[-1].reason
    return rejected[-1]


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ================================================================================ 1a
def test_1a_recommit_of_an_accepted_hash_under_an_unfetchable_location(tmp_path, models):
    net = Net(tmp_path)
    published = publish(models["a"], "local", hotkey=net.hotkey("honest"), storage_root=net.storage,
                        location="honest/ckpt")
    honest = net.commit("honest", encode_commitment(published))
    net.chain.advance(25)
    work = tmp_path / "v"
    assert net.validator_for(work).run(max_rounds=1) == 1
    state = ValidatorState(work / "validator.db")
    (accepted,) = state.submissions("accepted")
    stored = ModelStore(work / "submissions").path(accepted.model_hash)
    assert accepted.path == str(stored)
    assert net.weight(honest) == 1.0

    # The honest miner re-commits its hash under a server that is down; a copier commits the same
    # hash under a server that never answers. Before: the accepted files were cleared for the fetch.
    dead = f"127.0.0.1:{unused_port()}"
    down = encode_commitment(Commitment.for_model("http", dead, "t1", accepted.model_hash, honest))
    net.chain.commit(net.registered("honest"), down)
    copied = encode_commitment(Commitment.for_model("http", dead, "t2", accepted.model_hash, net.hotkey("copier")))
    copier = net.commit("copier", copied)
    net.chain.advance(10)
    for round_no in (2, 3):  # the second with a restarted validator on the same state
        assert net.validator_for(work).run(max_rounds=1) == 1
        verify_manifest(stored, read_manifest(stored))  # every accepted file still there, intact
        r = state.last_round()
        assert r.id == round_no and r.leader == honest
        scores = {s["hotkey"]: s for s in state.scores(r.id)}
        assert scores[copier]["gate"] == "exact_copy" and scores[copier]["composite"] == 0
        assert net.weight(honest) == 1.0 and net.weight(copier) == 0.0
        net.chain.advance(10)
    # the re-commits were checked in place, never downloaded: the unreachable server cost nothing
    assert {s.commitment for s in state.submissions("accepted")} == {encode_commitment(published), down, copied}
    assert all(s.path == str(stored) for s in state.submissions("accepted"))


# ================================================================================ 7
def served(files, delay_name=None, rate=None):
    """A rogue miner server for `files`; `delay_name` is sent at `rate` bytes/s in 1 KiB writes."""
    async def slow(request):
        response = web.StreamResponse(headers={"Content-Length": str(len(files[delay_name]))})
        await response.prepare(request)
        data = files[delay_name]
        for i in range(0, len(data), 1024):
            await response.write(data[i:i + 1024])
            await asyncio.sleep(1024 / rate)
        return response

    return Rogue({**files, **({delay_name: slow} if delay_name else {})}).app


def test_7_trickling_server_is_cut_off_fast_and_the_round_completes(tmp_path, models):
    net = Net(tmp_path)
    honest = net.commit("honest", encode_commitment(publish(models["a"], "local", hotkey=net.hotkey("honest"),
                                                            storage_root=net.storage, location="honest/ckpt")))
    files = real_files(models["b"])
    with running(served(files, WEIGHTS, rate=8 << 10)) as port:  # 8 KiB/s, never silent
        trickler = net.commit("trickler", encode_commitment(Commitment.for_model(
            "http", f"127.0.0.1:{port}", "t", read_manifest(models["b"]).model_hash, net.hotkey("trickler"))))
        net.chain.advance(25)
        v = net.validator_for(tmp_path / "v", min_rate=64 << 10, rate_grace=1.0, read_timeout=60,
                              total_timeout=3600, fetch_deadline=3600)
        fetch_phase, seconds = v._fetch_phase, []

        def timed(r):  # the fetch phase alone: the honest miner's evaluation is not the trickle's doing
            t0 = time.perf_counter()
            try:
                return fetch_phase(r)
            finally:
                seconds.append(time.perf_counter() - t0)

        v._fetch_phase = timed
        assert v.run(max_rounds=1) == 1
        seconds = sum(seconds)
    state = ValidatorState(tmp_path / "v" / "validator.db")
    s = rejection(state, trickler)
    assert s.stage == "fetch" and "transfer rate fell below" in s.reason, s.reason
    assert seconds < 30, seconds  # the per-fetch limits here were an hour
    assert net.weight(honest) == 1.0 and net.weight(trickler) == 0.0
    assert not list((tmp_path / "v" / "submissions").glob(".staging-*"))  # nothing half-written left


def variants(src, tmp_path, n):
    """`n` checkpoints with `src`'s weights but distinct model hashes (a tokenizer file differs)."""
    out = []
    for i in range(n):
        d = tmp_path / f"variant{i}"
        shutil.copytree(src, d, ignore=shutil.ignore_patterns("manifest.json"))
        (d / "tokenizer_config.json").write_text(json.dumps({"variant": i}))
        write_manifest(d)
        out.append(d)
    return out


def test_7_fetches_run_concurrently_under_one_round_deadline(tmp_path, models):
    """Four miners each serving at a legal but slow pace: the round waits for the slowest, not the sum;
    one that would outlast the round's deadline is cut off by it and rejected."""
    checkpoints = variants(models["b"], tmp_path, 4)
    size = (models["b"] / WEIGHTS).stat().st_size
    limits = FetchLimits(student_limits(parse_competition(redteam_competition())), min_rate=1 << 10, rate_grace=1.0)
    timings = {}
    for concurrency in (1, 4):
        with ExitStack() as servers:
            jobs = []
            for i, d in enumerate(checkpoints):  # each ~1.5 s
                port = servers.enter_context(running(served(real_files(d), WEIGHTS, rate=size / 1.5)))
                jobs.append(Job(f"hk{i}", encode_commitment(Commitment.for_model(
                    "http", f"127.0.0.1:{port}", "t", read_manifest(d).model_hash, f"hk{i}")), 1))
            outcomes = []
            settings = FetchSettings(limits, concurrency=concurrency, localnet=True)
            t0 = time.perf_counter()
            assert fetch_round(jobs, ModelStore(tmp_path / f"s{concurrency}"), settings, keypair=VALIDATOR,
                               accepted_hashes=[], record=outcomes.append, stop=threading.Event())
            timings[concurrency] = time.perf_counter() - t0
        assert [o.status for o in outcomes] == ["accepted"] * 4
    print(f"4 fetches of ~1.5 s: concurrency 1 {timings[1]:.1f} s, concurrency 4 {timings[4]:.1f} s")
    assert timings[4] < timings[1] / 2, timings
    with running(served(real_files(models["b"]), WEIGHTS, rate=size / 30)) as port:  # would take 30 s
        job = Job("slow", encode_commitment(Commitment.for_model("http", f"127.0.0.1:{port}", "t",
                                                                 read_manifest(models["b"]).model_hash, "slow")), 1)
        outcomes = []
        settings = FetchSettings(limits, round_deadline=2.0, localnet=True)
        t0 = time.perf_counter()
        fetch_round([job], ModelStore(tmp_path / "s"), settings, keypair=VALIDATOR, accepted_hashes=[],
                    record=outcomes.append, stop=threading.Event())
        assert time.perf_counter() - t0 < 5
    (o,) = outcomes
    assert o.status == "rejected" and o.stage == "fetch" and "round's fetch deadline" in o.reason


def bloat_header(path, target_bytes):
    """Pad model.safetensors' header with empty tensors up to `target_bytes` (still valid safetensors)."""
    import struct
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    end = len(data)
    for i in range(target_bytes // 64):
        header[f"x.{i:07d}"] = {"dtype": "F32", "shape": [0], "data_offsets": [end, end]}
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)


def test_7_huge_safetensors_header_is_refused_unread(tmp_path, models):
    net = Net(tmp_path)
    honest = net.commit("honest", encode_commitment(publish(models["a"], "local", hotkey=net.hotkey("honest"),
                                                            storage_root=net.storage, location="honest/ckpt")))
    bomb = tmp_path / "src" / "bomb"
    shutil.copytree(models["b"], bomb)
    bloat_header(bomb / WEIGHTS, 24 << 20)
    attacker = net.commit("bomb", plant(net.hotkey("bomb"), net.storage, bomb, "bomb/ckpt"))
    net.chain.advance(25)
    v = net.validator_for(tmp_path / "v")
    assert v.run(max_rounds=1) == 1
    s = rejection(ValidatorState(tmp_path / "v" / "validator.db"), attacker)
    assert s.stage == "header" and "byte cap" in s.reason, s.reason
    cap = int(s.reason.split("over the ")[1].split("-byte")[0])
    assert cap < 1 << 20  # derived from the tiny config's tensors, not the 100 MB format limit
    assert net.weight(honest) == 1.0 and net.weight(attacker) == 0.0


def test_7_disk_budget_evicts_what_no_round_needs(tmp_path, models):
    net = Net(tmp_path)
    first = publish(models["a"], "local", hotkey=net.hotkey("honest"), storage_root=net.storage, location="honest/one")
    honest = net.commit("honest", encode_commitment(first))
    attacker = net.commit("flooder", f"q2:local:nothing/here:t1:{'0' * 32}")  # rejected, stores nothing
    net.chain.advance(25)
    work = tmp_path / "v"
    store = ModelStore(work / "submissions")
    budget = 1  # byte: everything not needed goes as soon as it is not needed
    assert net.validator_for(work, disk_budget_bytes=budget).run(max_rounds=1) == 1
    first_hash = read_manifest(models["a"]).model_hash
    assert store.hashes() == [first_hash]
    # the honest miner publishes a new checkpoint; the old one is needed until the new one leads
    second_dir = tmp_path / "src" / "second"
    shutil.copytree(models["b"], second_dir)
    second = publish(second_dir, "local", hotkey=net.hotkey("honest"), storage_root=net.storage, location="honest/two")
    net.chain.commit(net.registered("honest"), encode_commitment(second))
    kept = []
    for _ in range(3):
        net.chain.advance(10)
        assert net.validator_for(work, disk_budget_bytes=budget).run(max_rounds=1) == 1
        kept.append(store.hashes())
    state = ValidatorState(work / "validator.db")
    second_hash = read_manifest(second_dir).model_hash
    # round 2: the old one is no longer eligible but still the last round's leader
    assert set(kept[0]) == {first_hash, second_hash}
    assert kept[-1] == [second_hash]  # superseded and no longer leading: evicted
    assert state.last_round().leader_hash == second_hash
    assert net.weight(honest) == 1.0 and net.weight(attacker) == 0.0
    rejection(state, attacker)


# ================================================================================ 8
class HostileHub(FakeHub):
    """The Hub stand-in, where the repo `evil/<case>` answers its files with `case`'s trick."""

    TRICKS = {
        "metadata": "http://169.254.169.254/latest/meta-data",
        "private10": "http://10.0.0.1/x",
        "nat64": "http://[64:ff9b::a00:1]/x",
        "sixtofour": "http://[2002:a00:1::1]/x",
        "compat": "http://[::10.0.0.1]/x",
        "mapped": "http://[::ffff:10.0.0.1]/x",
        "loopback": "http://127.0.0.2:9/x",
    }
    ECHO = "<script>alert('echo')</script>"

    async def resolve(self, request):
        owner, name = request.match_info["owner"], request.match_info["name"]
        if owner == "evil" and name in self.TRICKS and request.match_info["file"] != "manifest.json":
            raise web.HTTPFound(self.TRICKS[name])
        if owner == "evil" and name == "echo":
            return web.Response(status=500, reason=self.ECHO, text=self.ECHO * 20, headers={"X-Evil": self.ECHO})
        return await super().resolve(request)


def pinned_for_a_real_network(raw: dict) -> dict:
    """The competition as a real network needs it (Competition.unpinned() == []): the tiny
    tokenizer's real fingerprint, this machine's stack, a commit-shaped revision (the tiny teacher
    is local and ignores it), the local corpus pinned by its own revision."""
    from eval.evaluate import resolve_tokenizer
    from eval.heldout_data import local_revision
    from eval.stack import installed_versions
    from quasar_model.tokenization import tokenizer_fingerprint

    raw = json.loads(json.dumps(raw))
    raw["teacher"]["revision"] = "0" * 40
    raw["heldout"]["revision"] = local_revision(raw["heldout"]["split"])
    raw["tokenizer"]["fingerprint"] = tokenizer_fingerprint(resolve_tokenizer(parse_competition(raw)))
    raw["eval_stack"] = installed_versions()
    return raw


def test_8_redirects_to_private_addresses_and_echoing_servers(tmp_path, models):
    net = Net(tmp_path)
    # localnet=False below: the checks a real network gets, so the competition must be pinned too
    net.competition = parse_competition(pinned_for_a_real_network(redteam_competition()))
    hub = HostileHub()
    with running(hub.app) as port:
        endpoint = f"http://127.0.0.1:{port}"
        honest = net.commit("honest", encode_commitment(publish(
            models["a"], "hf", hotkey=net.hotkey("honest"), repo_id="honest/student", hf_token="owner",
            hf_endpoint=endpoint)))
        attackers = {}
        for case in (*HostileHub.TRICKS, "echo"):
            c = publish(models["b"], "hf", hotkey=net.hotkey(f"evil-{case}"), repo_id=f"evil/{case}",
                        hf_token="owner", hf_endpoint=endpoint)
            attackers[case] = net.commit(f"evil-{case}", encode_commitment(c))
        net.chain.advance(25)
        settings = ValidatorSettings(work_dir=tmp_path / "v", localnet=False, hf_endpoint=endpoint, poll_seconds=0.05)
        v = Validator(net.chain, net.validator, net.competition, settings)
        assert v.run(max_rounds=1) == 1
    state = ValidatorState(tmp_path / "v" / "validator.db")
    for case, hotkey in attackers.items():
        s = rejection(state, hotkey)
        assert s.stage == "fetch", (case, s)
        if case == "echo":
            assert "HTTP 500" in s.reason and "script" not in s.reason and "echo" not in s.reason, s.reason
        else:
            assert "not a public address" in s.reason or "refused" in s.reason, (case, s.reason)
        assert net.weight(hotkey) == 0.0
    assert net.weight(honest) == 1.0


@pytest.mark.parametrize("address", [
    "10.0.0.1", "127.0.0.1", "169.254.169.254", "100.64.0.1", "0.0.0.0", "224.0.0.1",
    "::1", "::", "fe80::1", "fc00::1", "ff02::1", "fe80::1%eth0",
    "::ffff:10.0.0.1", "::ffff:127.0.0.1",          # IPv4-mapped
    "::10.0.0.1", "::8.8.8.8",                       # IPv4-compatible: refused whatever it embeds
    "64:ff9b::a00:1", "64:ff9b::7f00:1",             # NAT64 of 10.0.0.1, 127.0.0.1
    "64:ff9b:1::808:808",                            # local-use NAT64
    "2002:a00:1::1", "2002:a9fe:a9fe::1",            # 6to4 of 10.0.0.1, 169.254.169.254
    "2001:0:4136:e378:8000:63bf:f5ff:fffe",          # Teredo
])
def test_8_private_addresses_in_every_ipv6_form_are_refused(address):
    assert address_problem(address) is not None


@pytest.mark.parametrize("address", ["8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808",
                                     "2002:808:808::1"])
def test_8_public_addresses_pass(address):
    assert address_problem(address) is None


def test_8_nonce_replayed_after_a_server_restart_is_refused(tmp_path, models):
    nonces = tmp_path / "miner" / "nonces.db"
    path = "/checkpoint/t1/manifest.json"

    def get(port, headers):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()

    headers = http_auth.sign(VALIDATOR, method="GET", path=path, receiver_ss58=MINER.ss58_address)
    with CheckpointServer(MINER.ss58_address, VALIDATORS.__contains__, nonce_path=nonces) as server:
        server.register("t1", models["a"])
        assert get(server.port, headers)[0] == 200
    with CheckpointServer(MINER.ss58_address, VALIDATORS.__contains__, nonce_path=nonces) as server:  # restarted
        server.register("t1", models["a"])
        status, body = get(server.port, headers)
        assert status == 401 and b"already accepted" in body
        fresh = http_auth.sign(VALIDATOR, method="GET", path=path, receiver_ss58=MINER.ss58_address)
        assert get(server.port, fresh)[0] == 200  # a new request is still served


def test_8_rejection_list_is_bounded_and_shows_only_printable_ascii(tmp_path, models):
    net = Net(tmp_path)
    honest = net.commit("honest", encode_commitment(publish(models["a"], "local", hotkey=net.hotkey("honest"),
                                                            storage_root=net.storage, location="honest/ckpt")))
    # one miner commits a stream of hostile strings, one per block (each a new rejection)
    spammer = net.key("spammer")
    for i in range(8):
        net.chain.commit(spammer, f"q2:local:\x1b[31m\u202e{i}:t1:" + "0" * 32)
        net.chain.advance(1)
    net.chain.advance(25)
    work = tmp_path / "v"
    assert net.validator_for(work).run(max_rounds=1) == 1
    state = ValidatorState(work / "validator.db")
    # and a long history of other hotkeys' rejections, as months of rounds would leave
    for i in range(3 * MAX_REJECTIONS):
        state.record_submission(1, Submission(f"hk{i % 400}", f"bad{i}", None, 100 + i, "rejected", "fetch",
                                              "x" * 5000, None))
    status = StatusServer(work / "validator.db").start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", status.port, timeout=10)
        conn.request("GET", "/leaderboard")
        board = json.loads(conn.getresponse().read())
    finally:
        status.stop()
    shown = board["rejected"]
    assert len(shown) == MAX_REJECTIONS
    per_hotkey = {}
    for r in shown:
        per_hotkey[r["hotkey"]] = per_hotkey.get(r["hotkey"], 0) + 1
        for value in r.values():
            assert all(" " <= ch <= "~" for ch in value), value
            assert len(value) < 400
    assert max(per_hotkey.values()) <= REJECTIONS_PER_HOTKEY
    assert net.weight(honest) == 1.0 and net.weight(spammer.ss58_address) == 0.0
    assert rejection(state, spammer.ss58_address).stage == "commitment"
