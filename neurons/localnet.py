"""`quasar localnet`: a whole subnet on this machine, as separate processes over loopback.

    chain      a LocalChain SQLite file with a wall-clock block (default 1 s)
    teacher    the tiny teacher this project trains on the local corpus (cached after the first run)
    cache      its top-k outputs on the corpus's train split (content-addressed, cached)
    miners     honest: miner-long (trains longest), miner-short (trains briefly);
               adversaries (neurons.adversaries), each attacking once: miner-copier (republishes
               miner-long's checkpoint under its own hotkey), miner-nearcopy (miner-long's checkpoint
               fine-tuned a few steps, committed later), miner-crasher (miner-long's checkpoint with
               an lm_head of +-3e38: finite, so it passes the fetch checks, but its logits are NaN),
               miner-teacher (the teacher structurally initialised into a Quasar-Long student);
               each its own `quasar miner` process serving its checkpoint over signed HTTP
    validator  one `quasar validator` process, until it has scored `rounds` rounds

Then it prints each miner's role and outcome (composite per round, gate or rejection, weight),
writes `report.json` and PNGs to the run directory and checks the outcome the subnet exists for:
the best honest miner holds the most weight, every adversary none, the validator ran as one process
from start to end, and the honest miners are scored above 0 in the order of their training.
Exit status 0 when all of that holds.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from distill.cli import teacher_cache_main
from eval.competition import load_competition
from neurons.keys import local_keypair
from neurons.localchain import LocalChain
from neurons.shutdown import die_with_parent
from neurons.state import ValidatorState
from quasar_model.atomic import write_atomic
from quasar_model.paths import cache_root
from quasar_model.progress import progress_bar
from quasar_model.teacher_outputs.tiny_teacher import TINY_TEACHER, recipe_id, tiny_teacher

HONEST = {
    # name: (total steps, steps per self-evaluation cycle), best first: their composites must keep this order
    "miner-long": (200, 200),
    "miner-short": (100, 100),
}
BEST = "miner-long"
ADVERSARIES = {
    # name: (role, neurons.adversaries kind, victim or None)
    "miner-copier": ("copier", "copy", BEST),
    "miner-nearcopy": ("near-copier", "near-copy", BEST),
    "miner-crasher": ("crasher", "crash", BEST),
    "miner-teacher": ("teacher-submitter", "teacher", None),
}
MINERS = [*HONEST, *ADVERSARIES]
VALIDATOR = "validator"
MARKER = ".quasar-localnet"  # written into every run directory localnet creates
DISTILL_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "distill_localnet.json"


def say(t0: float, msg: str) -> None:
    print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)


def train_cache(progress: bool = True) -> Path:
    """The tiny teacher's cache on the corpus train split, captured once per machine."""

    index = cache_root() / f"localnet-train-cache-{recipe_id()}.txt"
    if index.exists() and Path(index.read_text().strip()).is_dir():
        return Path(index.read_text().strip())
    path = teacher_cache_main(TINY_TEACHER, "corpus:train", cache_root() / "teacher-caches", k=32, seq_len=128,
                              device="cpu", dtype="float32", progress=progress)
    write_atomic(index, str(path))
    return path


def _spawn(name: str, argv: list[str], logs: Path, env: dict) -> subprocess.Popen:
    out = open(logs / f"{name}.log", "wb")
    # SIGTERM to the child when localnet dies in any way (SIGKILL too): no neuron outlives it
    return subprocess.Popen([sys.executable, "-m", "neurons.cli", *argv], stdout=out, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True, preexec_fn=die_with_parent(signal.SIGTERM))


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _plots(report: dict, out: Path) -> list[str]:
    import matplotlib  # here: only the finished run plots, and matplotlib costs a second to import
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    names = [r["name"] for r in report["miners"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(names, [r["weight"] for r in report["miners"]],
           color=["#4a7" if r["role"] == "honest" else "#c66" for r in report["miners"]])
    ax.tick_params(axis="x", labelrotation=30)
    ax.set_ylabel("weight on chain")
    ax.set_title("localnet: final weights")
    fig.tight_layout()
    fig.savefig(out / "weights.png", dpi=100)
    plt.close(fig)
    written.append("weights.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for r in report["miners"]:
        xs = [x["round"] for x in r["rounds"]]
        ax.plot(xs, [x["composite"] for x in r["rounds"]], marker="o", label=f"{r['name']} ({r['role']})")
    ax.set_xticks([x["id"] for x in report["rounds"]])
    ax.set_xlabel("round")
    ax.set_ylabel("composite score")
    ax.legend()
    ax.set_title("localnet: composite per round (gated = 0)")
    fig.tight_layout()
    fig.savefig(out / "scores.png", dpi=100)
    plt.close(fig)
    written.append("scores.png")
    return written


def role(name: str) -> str:
    return "honest" if name in HONEST else ADVERSARIES[name][0]


def _outcome(rounds: list[dict], rejected: list[dict], leader: bool) -> str:
    """One line: how the validator's last word on this miner went."""
    if rounds:
        last = rounds[-1]
        if last["gate"]:
            return f"gated {last['gate']}: {last['axes'].get('gate_reason', '')}".rstrip(": ")
        return f"composite {last['composite']:.4f}" + (" (leader)" if leader else "")
    if rejected:
        return f"rejected at {rejected[-1]['stage']}: {rejected[-1]['reason']}"
    return "never scored"


def build_report(run_dir: Path, chain, hotkeys: dict[str, str]) -> dict:
    state = ValidatorState(run_dir / VALIDATOR / "validator.db")
    names = {hk: name for name, hk in hotkeys.items()}
    vkey = hotkeys[VALIDATOR]
    weights = chain.latest_weights(vkey) or {}
    mg = chain.metagraph()
    rounds = [r for r in state.rounds() if r.phase == "done" and state.scores(r.id)]
    rejected = [{"miner": names.get(s.hotkey, s.hotkey), "stage": s.stage, "reason": s.reason}
                for s in state.submissions("rejected")]
    miners = []
    for name, hk in hotkeys.items():
        if name == VALIDATOR:
            continue
        uid = mg.uid_of(hk)
        per_round = []
        for r in rounds:
            for s in state.scores(r.id):
                if s["hotkey"] == hk:
                    per_round.append({"round": r.id, "composite": s["composite"], "gate": s["gate"],
                                      "rank": s["rank"], "axes": s["axes"]})
        mine = [x for x in rejected if x["miner"] == name]
        led = [r.id for r in rounds if r.leader == hk]
        miners.append({"name": name, "role": role(name), "hotkey": hk, "uid": uid, "weight": weights.get(uid, 0.0),
                       "led_rounds": led, "rejected": [{"stage": x["stage"], "reason": x["reason"]} for x in mine],
                       "outcome": _outcome(per_round, mine, bool(rounds) and rounds[-1].leader == hk),
                       "rounds": per_round})
    return {"rounds": [{"id": r.id, "sync_block": r.sync_block, "seed": r.seed,
                        "leader": names.get(r.leader, r.leader)} for r in rounds],
            "miners": miners, "rejected": rejected, "block": chain.block()}


def validator_run(proc: subprocess.Popen, log: Path) -> dict:
    """How the one validator process ran: its pid, exit status and the starts its log records (a
    Validator logs its `stack` event once per start, before any state exists)."""
    starts = 0
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                starts += json.loads(line).get("event") == "stack"
            except ValueError:
                pass
    return {"pid": proc.pid, "exit_status": proc.poll(), "starts": starts}


def pass_checks(report: dict, rounds: int) -> dict[str, bool]:
    """What a localnet run must show (issue 11): the honest best miner wins, no attack earns anything,
    no attack stopped the validator, and the scores rank honest work in the order of its training."""
    miners = {m["name"]: m for m in report["miners"]}
    best = miners[BEST]
    others = [m["weight"] for n, m in miners.items() if n != BEST]
    adversaries = [m for m in report["miners"] if m["role"] != "honest"]
    v = report["validator"]
    last = report["rounds"][-1]["id"] if report["rounds"] else None
    honest_last = [next((x for x in miners[n]["rounds"] if x["round"] == last), None) for n in HONEST]
    composites = [x["composite"] if x is not None and x["gate"] is None else 0.0 for x in honest_last]
    return {
        f"best honest miner ({BEST}) holds the most weight": best["weight"] > 0 and all(w < best["weight"] for w in others),
        "every adversary (" + ", ".join(m["role"] for m in adversaries) + ") has no weight and never led":
            all(m["weight"] == 0.0 and not m["led_rounds"] for m in adversaries),
        "the validator ran as one process, never restarted, and exited normally":
            v["exit_status"] == 0 and v["starts"] == 1,
        f"honest miners scored ungated, above 0, in training order ({' > '.join(HONEST)}) in the last round":
            len(composites) >= 2 and composites[-1] > 0 and all(a > b for a, b in zip(composites, composites[1:])),
        f"at least {rounds} rounds scored": len(report["rounds"]) >= rounds,
    }


def claim_run_dir(run_dir: Path, fresh: bool) -> None:
    """Make `run_dir` localnet's: create it with MARKER, or reuse (and, when `fresh`, empty) one that
    holds the marker. ValueError for a non-empty directory localnet did not create: emptying a
    directory someone named by mistake (`--out ~`) must never happen. A run directory from before
    the marker existed (chain.db and keys/) is adopted."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--out {run_dir}: not a directory")
    ours = (run_dir / MARKER).is_file() or ((run_dir / "chain.db").is_file() and (run_dir / "keys").is_dir())
    if run_dir.is_dir() and any(run_dir.iterdir()) and not ours:
        raise ValueError(f"--out {run_dir} is not empty and was not created by quasar localnet (no {MARKER}): "
                         "pass a new or empty directory")
    if fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / MARKER).write_text("created by quasar localnet; --out may empty this directory\n")


def run_localnet(run_dir: Path, *, rounds: int = 2, block_time: float = 1.0, timeout: float = 900.0,
                 fresh: bool = True) -> int:
    t0 = time.time()
    run_dir = Path(run_dir).resolve()
    claim_run_dir(run_dir, fresh)  # before any import or work: a refused directory costs nothing

    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    competition = load_competition("localnet")

    say(t0, "teacher: the tiny Qwen3 trained on the local corpus (cached after the first run)")
    tiny_teacher()
    say(t0, "teacher cache: top-32 log-probs on the corpus train split")
    cache = train_cache()
    say(t0, f"  {cache}")

    chain_path = run_dir / "chain.db"
    chain = LocalChain(chain_path, netuid=competition.netuid, block_time=block_time,
                       weights_rate_limit=competition.schedule.cadence_blocks // 2)
    key_dir = run_dir / "keys"
    hotkeys = {}
    for name in [VALIDATOR, *MINERS]:
        kp = local_keypair(f"{name}-default", key_dir)
        cold = local_keypair(f"{name}-coldkey", key_dir)
        chain.register(kp, cold.ss58_address, stake=100.0 if name == VALIDATOR else 0.0)
        hotkeys[name] = kp.ss58_address
    say(t0, f"chain: {chain_path.name}, block {chain.block()}, {len(hotkeys)} hotkeys registered")

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    common = ["--network", "localnet", "--chain.path", str(chain_path), "--wallet.path", str(key_dir),
              "--competition", "localnet"]
    procs: dict[str, subprocess.Popen] = {}
    for name in MINERS:
        argv = ["miner", *common, "--wallet.name", name, "--out", str(run_dir / name), "--quiet"]
        if name in ADVERSARIES:
            _, kind, victim = ADVERSARIES[name]
            argv += ["--adversary", kind] + (["--copy-from", str(run_dir / victim)] if victim else [])
        else:
            steps, cycle = HONEST[name]
            argv += ["--config", str(DISTILL_CONFIG), "--set", f"data.train_cache={cache}",
                     "--set", f"steps={steps}", "--steps-per-cycle", str(cycle)]
        procs[name] = _spawn(name, argv, logs, env)
    say(t0, "started " + ", ".join(f"{n} (pid {p.pid})" for n, p in procs.items()) + f"; logs in {logs}")
    validator_argv = ["validator", *common, "--wallet.name", VALIDATOR, "--out", str(run_dir / VALIDATOR),
                      "--max-rounds", str(rounds), "--poll-seconds", "1", "--quiet"]
    seen: dict[str, str] = {}
    status = None
    try:
        # the validator starts once every miner has something committed, so its first round already
        # has all of them; miners keep training and committing improvements meanwhile
        say(t0, "miners training (distil, self-evaluate, publish, commit); the validator starts at their first commits")
        status = _wait_for_commits(t0, chain, hotkeys, procs, seen, timeout, logs,
                                   competition.schedule.cadence_blocks, competition.schedule.eval_delay_blocks)
        if status is None:
            procs[VALIDATOR] = _spawn(VALIDATOR, validator_argv, logs, env)
            say(t0, f"validator started (pid {procs[VALIDATOR].pid}); {rounds} rounds to score")
            status = _watch(t0, run_dir, chain, hotkeys, procs, rounds, timeout, logs, seen)
    finally:
        for name, p in procs.items():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for name, p in procs.items():
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
    if status is not None:
        return status

    report = build_report(run_dir, chain, hotkeys)
    report["seconds"] = round(time.time() - t0, 1)
    report["validator"] = validator_run(procs[VALIDATOR], logs / f"{VALIDATOR}.log")
    checks = pass_checks(report, rounds)
    report["checks"] = checks
    report["pngs"] = _plots(report, run_dir)
    (run_dir / "report.json").write_text(json.dumps(report, indent=1))

    print()
    print(f"{'miner':<15} {'role':<17} {'uid':>3} {'weight':>6}  outcome; composite per round (gate)")
    for m in report["miners"]:
        hist = "  ".join(f"r{x['round']}: {x['composite']:.4f}" + (f" ({x['gate']})" if x["gate"] else "")
                         for x in m["rounds"])
        print(f"{m['name']:<15} {m['role']:<17} {m['uid']:>3} {m['weight']:>6.3f}  {m['outcome']}"
              + (f"; {hist}" if hist else ""))
    v = report["validator"]
    print(f"validator pid {v['pid']}: exit status {v['exit_status']}, {v['starts']} start(s) in its log")
    print()
    for what, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {what}")
    say(t0, f"report: {run_dir / 'report.json'}, " + ", ".join(str(run_dir / p) for p in report["pngs"]))
    return 0 if all(checks.values()) else 1


def _failed(t0, procs, logs) -> int | None:
    for name, p in procs.items():
        code = p.poll()
        if code is not None and (name != VALIDATOR or code != 0):
            say(t0, f"{name} exited with status {code}; last lines of its log:\n{_tail(logs / f'{name}.log')}")
            return 3
    return None


def _new_commits(t0, chain, hotkeys, seen: dict[str, str], write=print) -> None:
    names = {hk: n for n, hk in hotkeys.items()}
    for hk, rec in chain.commitments().items():
        if seen.get(hk) != rec.data:
            seen[hk] = rec.data
            write(f"[{time.time() - t0:6.1f}s] block {rec.block}: {names.get(hk, hk)} committed {rec.data}")


def _wait_for_commits(t0, chain, hotkeys, procs, seen, timeout, logs, cadence, delay) -> int | None:
    """Until every miner has committed and the next round's sync block makes all of them eligible."""
    miners = {hotkeys[n] for n in MINERS}

    def ready() -> bool:
        if not miners <= set(seen):
            return False
        last = max(rec.block for hk, rec in chain.commitments().items() if hk in miners)
        return (chain.block() // cadence) * cadence - delay >= last

    while not ready():
        if time.time() - t0 > timeout:
            say(t0, f"timed out after {timeout:.0f}s waiting for the miners' first commitments")
            return 2
        failed = _failed(t0, procs, logs)
        if failed is not None:
            return failed
        _new_commits(t0, chain, hotkeys, seen)
        time.sleep(1.0)
    return None


def _watch(t0, run_dir, chain, hotkeys, procs, rounds, timeout, logs, seen) -> int | None:
    """Show progress until the validator has scored `rounds` rounds; an exit status on failure."""

    names = {hk: n for n, hk in hotkeys.items()}
    state = None
    bar = progress_bar(total=rounds, desc="rounds scored", unit="round")
    try:
        while True:
            if time.time() - t0 > timeout:
                say(t0, f"timed out after {timeout:.0f}s")
                return 2
            failed = _failed(t0, procs, logs)
            if failed is not None:
                return failed
            _new_commits(t0, chain, hotkeys, seen, bar.write)
            if state is None and (run_dir / VALIDATOR / "validator.db").exists():
                state = ValidatorState(run_dir / VALIDATOR / "validator.db")
            if state is not None:
                done = [r for r in state.rounds() if r.phase == "done" and state.scores(r.id)]
                if len(done) > bar.n:
                    for r in done[bar.n:]:
                        board = ", ".join(f"{names.get(s['hotkey'], '?')} {s['composite']:.4f}"
                                          + (f" [{s['gate']}]" if s["gate"] else "") for s in state.scores(r.id))
                        bar.write(f"[{time.time() - t0:6.1f}s] round {r.id} (block {r.sync_block}): "
                                   f"leader {names.get(r.leader, r.leader)}; {board}")
                    bar.update(len(done) - bar.n)
                current = state.unfinished_round()
                bar.set_postfix(block=chain.block(), phase=current.phase if current else "waiting")
            if procs[VALIDATOR].poll() == 0:
                bar.close()
                return None
            time.sleep(1.0)
    finally:
        bar.close()
