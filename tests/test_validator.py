"""The validator end to end on a local chain: hostile submissions, copies, SIGKILL at random points.

Real pieces throughout: LocalChain (sr25519-signed writes), local and HTTP storage, the fetch
checks, the evaluator on a small competition, the scoring rule and the SQLite state.
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from aiohttp import web
from safetensors.torch import load_file, save_file

from eval.competition import load_competition, parse_competition
from neurons.commitment import Commitment, encode_commitment
from neurons.keys import local_keypair
from neurons.localchain import LocalChain
from neurons.manifest import write_manifest
from neurons.state import ValidatorState
from neurons.storage import publish
from neurons.validator import Validator, ValidatorSettings
from quasar_model import QuasarLongConfig, QuasarLongForCausalLM

VOCAB = 1024  # the localnet competition's tokenizer (the tiny teacher's)


def small_competition() -> dict:
    raw = load_competition("localnet").to_dict()
    raw["heldout"].update(documents=4, seq_len=64)
    raw["recall"].update(context_len=256, families=["passkey"], lengths=[1], depth_bins=2, prefill_chunk=256,
                         max_answer_tokens=6)
    raw["score"].update(fingerprint_probes=4, bootstrap_resamples=200)
    return raw


def quick_competition() -> dict:
    """small_competition with 2 held-out documents, for rounds whose assertions do not read score
    values (a rejection and its reason, a gate, a sole scorer's weight, results equal to a reference
    run's): each evaluation child scores about twice as fast (greedy continuations, one per held-out
    document up to eval.evaluate.CONTINUATIONS, are most of a tiny model's evaluation)."""
    raw = small_competition()
    raw["heldout"].update(documents=2)
    return raw


def student(d: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    QuasarLongForCausalLM(QuasarLongConfig.preset("tiny", vocab_size=VOCAB)).save_pretrained(d)
    return d


def plant(hotkey: str, root: Path, src: Path, location: str, token: str = "t1") -> str:
    """Put a (possibly hostile) checkpoint where a `local` commitment points, as a miner could; the
    string `hotkey` commits."""
    m = write_manifest(src)
    target = root / location / token
    shutil.copytree(src, target)
    return encode_commitment(Commitment.for_model("local", location, token, m.model_hash, hotkey))


class Subnet:
    def __init__(self, tmp: Path, competition: dict | None = None):
        self.tmp = tmp
        self.chain = LocalChain(tmp / "chain.db", block_time=None, weights_rate_limit=1)
        self.keys = tmp / "keys"
        self.storage = tmp / "storage"
        self.storage.mkdir()
        raw = competition or small_competition()
        self.competition_path = tmp / "competition.json"
        self.competition_path.write_text(json.dumps(raw))
        self.competition = parse_competition(raw)
        self.validator = self.key("validator", stake=100.0)

    def key(self, name, stake=0.0):
        kp = local_keypair(f"{name}-default", self.keys)
        self.chain.register(kp, local_keypair(f"{name}-cold", self.keys).ss58_address, stake=stake)
        return kp

    def hotkey(self, name: str) -> str:
        """The ss58 address `key(name)` registers (a miner knows it before registering)."""
        return local_keypair(f"{name}-default", self.keys).ss58_address

    def commit(self, name: str, data: str) -> str:
        kp = self.key(name)
        self.chain.commit(kp, data)
        return kp.ss58_address

    def settings(self, work: Path, **kw) -> ValidatorSettings:
        return ValidatorSettings(work_dir=work, localnet=True, storage_root=self.storage, poll_seconds=0.05, **kw)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return {name: student(d / name, seed) for name, seed in [("a", 1), ("b", 2), ("c", 3)]}


def _trickle_server():
    """An HTTP server whose manifest download never ends."""
    async def forever(request):
        resp = web.StreamResponse(headers={"Content-Length": str(10 ** 9)})
        await resp.prepare(request)
        while True:
            await resp.write(b" ")
            await __import__("asyncio").sleep(0.2)

    import asyncio
    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_get("/{tail:.*}", forever)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    threading.Thread(target=loop.run_forever, daemon=True).start()
    return port


def test_hostile_submissions_are_rejected_with_reasons_and_the_round_goes_on(tmp_path, models):
    net = Subnet(tmp_path)
    good = net.commit("good", encode_commitment(publish(models["a"], "local", hotkey=net.hotkey("good"), storage_root=net.storage,
                                                        location="good/ckpt")))

    def variant(name, edit):
        d = tmp_path / "src" / name
        shutil.copytree(models["b"], d)
        edit(d)
        return net.commit(name, plant(net.hotkey(name), net.storage, d, f"{name}/ckpt"))

    def nan(d):
        t = load_file(d / "model.safetensors")
        next(v for k, v in sorted(t.items()) if v.is_floating_point())[0] = float("nan")
        save_file(t, d / "model.safetensors", metadata={"format": "pt"})

    def config(**changes):
        def edit(d):
            cfg = json.loads((d / "config.json").read_text())
            cfg.update(changes)
            (d / "config.json").write_text(json.dumps(cfg))
        return edit

    hostile = {
        variant("nan", nan): ("weights", "nan"),
        variant("bomb", config(vocab_size=10 ** 9, num_hidden_layers=10 ** 6)): ("config", ""),
        variant("arch", config(model_type="llama", architectures=["LlamaForCausalLM"])): ("config", ""),
    }
    # a pickle and a .py planted next to a valid checkpoint after its manifest was written
    for name, extra in [("pickle", "model.bin"), ("code", "modeling_evil.py")]:
        data = plant(net.hotkey(name), net.storage, models["c"], f"{name}/ckpt")
        (net.storage / name / "ckpt" / "t1" / extra).write_bytes(b"\x80\x04K\x01.")
        hostile[net.commit(name, data)] = ("", "")
    # a sha256 mismatch: bytes changed after the manifest
    data = plant(net.hotkey("flip"), net.storage, models["c"], "flip/ckpt")
    w = net.storage / "flip" / "ckpt" / "t1" / "model.safetensors"
    raw = bytearray(w.read_bytes()); raw[-1] ^= 1; w.write_bytes(bytes(raw))
    hostile[net.commit("flip", data)] = ("", "sha256")
    hostile[net.commit("grammar", "q2:local:../etc:t1:" + "0" * 32)] = ("commitment", "")
    hostile[net.commit("version", "q9:local:x:t1:" + "0" * 32)] = ("commitment", "")
    port = _trickle_server()
    hostile[net.commit("slow", f"q2:http:127.0.0.1:{port}:t1:" + "0" * 32)] = ("fetch", "")

    net.chain.advance(25)
    v = Validator(net.chain, net.validator, net.competition,
                  net.settings(tmp_path / "v", read_timeout=1.0, total_timeout=3.0))
    t0 = time.time()
    assert v.run(max_rounds=1) == 1
    assert time.time() - t0 < 120

    state = ValidatorState(tmp_path / "v" / "validator.db")
    rejected = {s.hotkey: s for s in state.submissions("rejected")}
    for hotkey, (stage, word) in hostile.items():
        assert hotkey in rejected, f"hostile submission {hotkey} was not rejected"
        s = rejected[hotkey]
        assert s.reason, "every rejection records a reason"
        assert stage in (s.stage or ""), (s.stage, s.reason)
        assert word in s.reason.lower(), s.reason
    assert [s.hotkey for s in state.submissions("accepted")] == [good]
    r = state.last_round()
    assert [s["hotkey"] for s in state.scores(r.id)] == [good]
    # nothing outside the validator's own directory was written by fetching
    assert not (tmp_path / "etc").exists()


def _subnet_with_copier(tmp_path, models, extra_seeds=(), competition=None):
    net = Subnet(tmp_path, competition)
    owners = {}
    for name in ("a", "b", "c"):
        owners[name] = net.commit(f"miner-{name}", encode_commitment(
            publish(models[name], "local", hotkey=net.hotkey(f"miner-{name}"), storage_root=net.storage, location=f"{name}/ckpt")))
    for seed in extra_seeds:
        name = f"extra{seed}"
        owners[name] = net.commit(name, encode_commitment(publish(
            student(tmp_path / "src" / name, seed), "local", hotkey=net.hotkey(name), storage_root=net.storage,
            location=f"{name}/ckpt")))
    net.chain.advance(1)  # the copy lands in a later block than the original it copies
    copy = tmp_path / "copy"
    shutil.copytree(models["a"], copy, ignore=shutil.ignore_patterns("manifest.json"))
    owners["copier"] = net.commit("copier", encode_commitment(
        publish(copy, "local", hotkey=net.hotkey("copier"), storage_root=net.storage, location="copier/ckpt")))
    net.chain.advance(25)
    return net, owners


def test_exact_copy_gets_nothing(tmp_path, models):
    # Random-init students are degenerate or not depending on the round seed, which comes from the
    # chain's random genesis secret: with the degenerate gate on, some chains leave every honest
    # miner at 0 and no weights are set at all (a run that then passed or crashed by luck). This
    # test is about the copy gate, so the degenerate gate is off (it fires only above the share).
    raw = small_competition()
    raw["score"]["degenerate_max_repeat"] = 1.0
    net, owners = _subnet_with_copier(tmp_path, models, competition=raw)
    v = Validator(net.chain, net.validator, net.competition, net.settings(tmp_path / "v"))
    assert v.run(max_rounds=1) == 1
    state = ValidatorState(tmp_path / "v" / "validator.db")
    scores = {s["hotkey"]: s for s in state.scores(state.last_round().id)}
    assert scores[owners["a"]]["gate"] is None and scores[owners["a"]]["composite"] > 0  # the original counts
    assert scores[owners["copier"]]["gate"] == "exact_copy" and scores[owners["copier"]]["composite"] == 0
    assert owners["copier"] not in state.ema()
    weights = net.chain.latest_weights(net.validator.ss58_address)
    assert weights and sum(weights.values()) > 0  # weights were set, so the copier's 0 means something
    assert weights.get(net.chain.metagraph().uid_of(owners["copier"]), 0.0) == 0.0


def _validator_cmd(net: Subnet, work: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "neurons.cli", "validator", "--network", "localnet", "--chain.path",
            str(net.chain.path), "--wallet.path", str(net.keys), "--wallet.name", "validator",
            "--competition", str(net.competition_path), "--out", str(work), "--storage-root",
            str(net.storage), "--max-rounds", "1", "--status-port", "-1", "--poll-seconds", "0.1", "--quiet", *extra]


@pytest.mark.slow
def test_sigkill_at_random_points_loses_and_double_counts_nothing(tmp_path, models):
    # more submissions than the other tests: a round long enough to be killed in six times
    net, owners = _subnet_with_copier(tmp_path, models, extra_seeds=range(4, 10), competition=quick_competition())
    # the reference: the same round, never interrupted, on a copy of the chain as it is now
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    for f in tmp_path.glob("chain.db*"):
        shutil.copy(f, ref_dir / f.name)
    ref_chain = LocalChain(ref_dir / "chain.db")
    ref = Validator(ref_chain, net.validator, net.competition, net.settings(ref_dir / "v"))
    assert ref.run(max_rounds=1) == 1
    ref_state = ValidatorState(ref_dir / "v" / "validator.db")

    work = tmp_path / "v"
    db = work / "validator.db"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    rng = random.Random(0)
    killed_in = []  # the round's phase at each kill
    # these kills are the operator's, not a submission's: no evaluation they cut short may count
    # against its submission (tests/test_redteam_isolation.py checks that rule on its own)
    cmd = _validator_cmd(net, work, "--max-eval-attempts", "1000")
    while len(killed_in) < 6:
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while not db.exists() and p.poll() is None:  # interpreter and torch start-up are not the round
            time.sleep(0.05)
        try:
            p.wait(rng.uniform(0.2, 4.0))
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.wait()
            r = ValidatorState(db).unfinished_round()
            if r is not None:
                killed_in.append(r.phase)
            continue
        assert p.returncode == 0, p.stderr.read().decode()[-2000:]
        break
    state = ValidatorState(db)
    if state.unfinished_round() is not None or not state.rounds():
        p = subprocess.run(cmd, env=env, capture_output=True, timeout=300)
        assert p.returncode == 0, p.stderr.decode()[-2000:]

    assert len(killed_in) >= 6, killed_in  # six kills landed inside the round
    rounds = state.rounds()
    assert len(rounds) == 1 and rounds[0].phase == "done"
    rid, ref_rid = rounds[0].id, ref_state.rounds()[0].id
    assert set(state.results(rid)) == set(owners.values())            # one result per hotkey, none lost
    assert state.results(rid) == ref_state.results(ref_rid)            # and identical to the clean run
    assert state.scores(rid) == ref_state.scores(ref_rid)
    assert state.ema() == ref_state.ema()                              # the EMA applied exactly once
    assert state.weights(rid) == ref_state.weights(ref_rid)
    n_writes = net.chain._conn().execute("SELECT COUNT(*) FROM weights WHERE hotkey = ?",
                                         (net.validator.ss58_address,)).fetchone()[0]
    assert n_writes == 1                                               # weights sent once


@pytest.mark.slow
def test_sigterm_stops_cleanly_and_the_round_resumes(tmp_path, models):
    net, owners = _subnet_with_copier(tmp_path, models, competition=quick_competition())
    work = tmp_path / "v"
    p = subprocess.Popen(_validator_cmd(net, work), env=dict(os.environ, OMP_NUM_THREADS="1"),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while not (work / "validator.db").exists() and p.poll() is None:
        time.sleep(0.05)
    time.sleep(1.0)
    p.send_signal(signal.SIGTERM)
    assert p.wait(60) == 0  # a clean exit, not a traceback or a kill
    logs = [json.loads(line) for line in p.stderr.read().decode().splitlines() if line.startswith("{")]
    assert any(e["event"] == "shutdown requested" and e["signal"] == "SIGTERM" for e in logs)
    p = subprocess.run(_validator_cmd(net, work), env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    state = ValidatorState(work / "validator.db")
    assert [r.phase for r in state.rounds()] == ["done"] and set(state.results(1)) == set(owners.values())


def test_unreachable_storage_is_retried_next_round_not_rejected(tmp_path, models):
    import socket

    net = Subnet(tmp_path)
    good = net.commit("good", encode_commitment(publish(models["a"], "local", hotkey=net.hotkey("good"), storage_root=net.storage,
                                                        location="good/ckpt")))
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = f"q2:http:127.0.0.1:{port}:t1:" + "0" * 32
    down = net.commit("down", data)
    net.chain.advance(25)
    v = Validator(net.chain, net.validator, net.competition, net.settings(tmp_path / "v"))
    assert v.run(max_rounds=1) == 1
    state = ValidatorState(tmp_path / "v" / "validator.db")
    assert state.submission(down, data) is None          # not recorded: the next round tries again
    assert [s["hotkey"] for s in state.scores(state.last_round().id)] == [good]
