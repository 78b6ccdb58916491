"""`quasar localnet`: a whole subnet on this machine, as separate processes over loopback.

    chain      a LocalChain SQLite file with a wall-clock block (default 1 s)
    teacher    the tiny teacher this project trains on the local corpus (cached after the first run)
    cache      its top-k outputs on the corpus's train split (content-addressed, cached)
    miners     miner-long (trains longest), miner-short (trains briefly), miner-copier (republishes
               miner-long's checkpoint under its own hotkey), each its own `quasar miner` process
               serving its checkpoint over signed HTTP
    validator  one `quasar validator` process, until it has scored `rounds` rounds

Then it prints the leaderboard and weights, writes `report.json` and PNGs to the run directory and
checks the outcome the subnet exists for: the best honest miner has the most weight, the copier none.
Exit status 0 when that holds.
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

from neurons.shutdown import die_with_parent

MINERS = {
    # name: (total steps, steps per self-evaluation cycle) or None for the copier
    "miner-long": (800, 400),
    "miner-short": (250, 250),
    "miner-copier": None,
}
VALIDATOR = "validator"
DISTILL_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "distill_localnet.json"


def say(t0: float, msg: str) -> None:
    print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)


def train_cache(progress: bool = True) -> Path:
    """The tiny teacher's cache on the corpus train split, captured once per machine."""
    from distill.cli import teacher_cache_main
    from distill.tiny_teacher import cache_root, recipe_id

    index = cache_root() / f"localnet-train-cache-{recipe_id()}.txt"
    if index.exists() and Path(index.read_text().strip()).is_dir():
        return Path(index.read_text().strip())
    path = teacher_cache_main("tiny", "corpus:train", cache_root() / "teacher-caches", k=32, seq_len=128,
                              device="cpu", dtype="float32", progress=progress)
    tmp = index.with_suffix(".tmp")
    tmp.write_text(str(path))
    os.replace(tmp, index)
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
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    names = [r["name"] for r in report["miners"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(names, [r["weight"] for r in report["miners"]], color=["#4a7", "#79c", "#c66"][:len(names)])
    ax.set_ylabel("weight on chain")
    ax.set_title("localnet: final weights")
    fig.tight_layout()
    fig.savefig(out / "weights.png", dpi=100)
    plt.close(fig)
    written.append("weights.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for r in report["miners"]:
        xs = [x["round"] for x in r["rounds"]]
        ax.plot(xs, [x["composite"] for x in r["rounds"]], marker="o", label=r["name"])
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


def build_report(run_dir: Path, chain, hotkeys: dict[str, str]) -> dict:
    from neurons.state import ValidatorState

    state = ValidatorState(run_dir / VALIDATOR / "validator.db")
    names = {hk: name for name, hk in hotkeys.items()}
    vkey = hotkeys[VALIDATOR]
    weights = chain.latest_weights(vkey) or {}
    mg = chain.metagraph()
    rounds = [r for r in state.rounds() if r.phase == "done" and state.scores(r.id)]
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
        miners.append({"name": name, "hotkey": hk, "uid": uid, "weight": weights.get(uid, 0.0),
                       "rounds": per_round})
    rejected = [{"miner": names.get(s.hotkey, s.hotkey), "stage": s.stage, "reason": s.reason}
                for s in state.submissions("rejected")]
    return {"rounds": [{"id": r.id, "sync_block": r.sync_block, "seed": r.seed,
                        "leader": names.get(r.leader, r.leader)} for r in rounds],
            "miners": miners, "rejected": rejected, "block": chain.block()}


def run_localnet(run_dir: Path, *, rounds: int = 2, block_time: float = 1.0, timeout: float = 900.0,
                 fresh: bool = True) -> int:
    from eval.competition import load_competition
    from neurons.keys import local_keypair
    from neurons.localchain import LocalChain

    t0 = time.time()
    run_dir = Path(run_dir).resolve()
    if fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    competition = load_competition("localnet")

    say(t0, "teacher: the tiny Qwen3 trained on the local corpus (cached after the first run)")
    from distill.tiny_teacher import tiny_teacher
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
    common = ["--network", "local", "--chain.path", str(chain_path), "--wallet.path", str(key_dir),
              "--competition", "localnet"]
    procs: dict[str, subprocess.Popen] = {}
    for name, plan in MINERS.items():
        argv = ["miner", *common, "--wallet.name", name, "--work-dir", str(run_dir / name), "--quiet"]
        if plan is None:
            argv += ["--copy-from", str(run_dir / "miner-long")]
        else:
            steps, cycle = plan
            argv += ["--config", str(DISTILL_CONFIG), "--override", f"data.train_cache={cache}",
                     "--override", f"steps={steps}", "--steps-per-cycle", str(cycle)]
        procs[name] = _spawn(name, argv, logs, env)
    say(t0, "started " + ", ".join(f"{n} (pid {p.pid})" for n, p in procs.items()) + f"; logs in {logs}")
    validator_argv = ["validator", *common, "--wallet.name", VALIDATOR, "--work-dir", str(run_dir / VALIDATOR),
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
    best = max((m for m in report["miners"] if m["name"] != "miner-copier"), key=lambda m: m["weight"])
    copier = next(m for m in report["miners"] if m["name"] == "miner-copier")
    checks = {
        "best honest miner (miner-long) has the most weight": best["name"] == "miner-long" and best["weight"] > 0,
        "the copier has no weight": copier["weight"] == 0.0,
        f"at least {rounds} rounds scored": len(report["rounds"]) >= rounds,
    }
    report["checks"] = checks
    report["pngs"] = _plots(report, run_dir)
    (run_dir / "report.json").write_text(json.dumps(report, indent=1))

    print()
    print(f"{'miner':<14} {'uid':>3} {'weight':>7}  composite per round (gate)")
    for m in report["miners"]:
        hist = "  ".join(f"r{x['round']}: {x['composite']:.4f}" + (f" ({x['gate']})" if x["gate"] else "")
                         for x in m["rounds"])
        print(f"{m['name']:<14} {m['uid']:>3} {m['weight']:>7.3f}  {hist}")
    for r in report["rejected"]:
        print(f"rejected {r['miner']}: [{r['stage']}] {r['reason']}")
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
    from tqdm import tqdm

    from neurons.state import ValidatorState

    names = {hk: n for n, hk in hotkeys.items()}
    state = None
    bar = tqdm(total=rounds, desc="rounds scored", unit="round", dynamic_ncols=True)
    try:
        while True:
            if time.time() - t0 > timeout:
                say(t0, f"timed out after {timeout:.0f}s")
                return 2
            failed = _failed(t0, procs, logs)
            if failed is not None:
                return failed
            _new_commits(t0, chain, hotkeys, seen, tqdm.write)
            if state is None and (run_dir / VALIDATOR / "validator.db").exists():
                state = ValidatorState(run_dir / VALIDATOR / "validator.db")
            if state is not None:
                done = [r for r in state.rounds() if r.phase == "done" and state.scores(r.id)]
                if len(done) > bar.n:
                    for r in done[bar.n:]:
                        board = ", ".join(f"{names.get(s['hotkey'], '?')} {s['composite']:.4f}"
                                          + (f" [{s['gate']}]" if s["gate"] else "") for s in state.scores(r.id))
                        tqdm.write(f"[{time.time() - t0:6.1f}s] round {r.id} (block {r.sync_block}): "
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
