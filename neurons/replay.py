"""`quasar eval --replay ROUND`: re-run a stored validator round offline and compare it with the record.

Everything a round's scores depend on is in the validator's directory: the round's seed and
competition digest, each submission's fetched checkpoint, the stored per-item results, and the
state the ranking reads (first commit blocks, the previous leader). Replaying
re-evaluates every submission on the round's seed, compares each fresh result with the stored one
(on the machine and device the round ran on they must be bit-identical) and re-ranks the round
with `neurons.validator.score_results`, the score phase's own code.

The EMA is not replayed: the state keeps only the latest one, not the one each round started from.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from eval.competition import Competition, load_competition
from neurons.state import Round, Submission, ValidatorState
from neurons.validator import label_results, score_results
from quasar_model.devices import resolve_device


class ReplayError(RuntimeError):
    pass


def _load_round(state: ValidatorState, round_id: int, competition: Competition) -> Round:
    r = state.round(round_id)
    if r is None:
        known = [x.id for x in state.rounds()]
        raise ReplayError(f"round {round_id} is not in {state.path} (rounds stored: {known or 'none'})")
    if r.phase != "done":
        raise ReplayError(f"round {round_id} is not finished (phase {r.phase!r}): there is no final record to "
                          "compare a replay with")
    if r.competition != competition.digest:
        raise ReplayError(f"round {round_id} was scored under competition digest {r.competition}, the given "
                          f"competition has digest {competition.digest}: replay with the file that round used")
    return r


def _submission_of(state: ValidatorState, r: Round, hotkey: str, model_hash: str,
                   competition: Competition) -> Submission | None:
    """The accepted submission the round evaluated for `hotkey`: as `Validator.eligible` picked it, the
    latest one old enough at the round's sync block, restricted to the weights the result names."""
    cutoff = r.sync_block - competition.schedule.eval_delay_blocks
    found = [s for s in state.submissions("accepted")
             if s.hotkey == hotkey and s.model_hash == model_hash and s.commit_block <= cutoff]
    return found[-1] if found else None  # ordered by commit block


def _checkpoint_dir(work_dir: Path, s: Submission) -> Path | None:
    # the stored path may be relative to the validator's cwd, or the work dir may have been moved:
    # fetched checkpoints always live in <work_dir>/submissions/
    for p in (Path(s.path), work_dir / "submissions" / Path(s.path).name):
        if (p / "config.json").is_file():
            return p
    return None


def _item_diff(fresh: dict, stored: dict) -> tuple[float, int]:
    """(max |fresh - stored| over the items both have, how many items only one side has)."""
    a = {(i["axis"], i["item_id"]): i["value"] for i in fresh.get("items", [])}
    b = {(i["axis"], i["item_id"]): i["value"] for i in stored.get("items", [])}
    worst = 0.0
    for k in a.keys() & b.keys():
        x, y = a[k], b[k]
        if x == y or (math.isnan(x) and math.isnan(y)):  # NaN == NaN: the same broken output
            continue
        worst = max(worst, abs(x - y) if math.isfinite(x) and math.isfinite(y) else math.inf)
    return worst, len(a.keys() ^ b.keys())


def replay_round(work_dir, round_id: int, competition: Competition, *, device: str = "cpu",
                 progress: bool = True, cache_root=None, out=None) -> dict:
    """Re-evaluate and re-rank a finished round; the comparison as a dict (also OUT/replay.json and one
    eval report per hotkey under OUT/<hotkey>/ when `out` is given)."""
    from eval.evaluate import load_student, prepare_round, score_model  # torch: `quasar --help` imports this module

    work_dir = Path(work_dir)
    db = work_dir / "validator.db"
    if not db.is_file():
        raise ReplayError(f"no validator state at {db} (is --validator-dir the validator's --out?)")
    state = ValidatorState(db)
    try:
        r = _load_round(state, round_id, competition)
        stored = state.results(r.id)
        subs = {h: _submission_of(state, r, h, m, competition) for h, (m, _) in stored.items()}
        dirs, missing = {}, []
        for h, s in sorted(subs.items()):
            d = None if s is None or s.path is None else _checkpoint_dir(work_dir, s)
            if d is None:
                missing.append(f"{h} ({stored[h][0][:16]}): " + (f"{s.path} is gone" if s else "no accepted submission"))
            dirs[h] = d
        if missing:
            raise ReplayError(f"round {r.id} cannot be replayed completely: the fetched checkpoint of "
                              f"{len(missing)} submission(s) is missing, and without its weights a result cannot "
                              "be recomputed:\n  " + "\n  ".join(missing))

        inputs = prepare_round(competition, r.seed, cache_root=cache_root, device=device, progress=progress)
        fresh: dict[str, tuple[str, dict]] = {}
        by_hash: dict[str, dict] = {}
        for h, (model_hash, _) in sorted(stored.items()):
            if model_hash not in by_hash:  # as the validator did: the same weights are evaluated once
                model = load_student(dirs[h], competition, device)
                by_hash[model_hash] = score_model(model, inputs, model_hash=model_hash, device=device,
                                                  progress=progress).to_dict()
            fresh[h] = (model_hash, by_hash[model_hash])

        results = label_results(fresh, {h: s.commit_block for h, s in subs.items()})
        stored_scores = {s["hotkey"]: s for s in state.scores(r.id)}
        uids = {h: s["uid"] for h, s in stored_scores.items()}
        # registered hotkeys and the prior EMA only shape the EMA, which a replay does not check
        ranking, _, scores = score_results(state, r, results, list(stored), uids.get, competition, {})
    finally:
        state.close()

    replayed = {s["hotkey"]: s for s in scores}
    hotkeys = {}
    for h, (model_hash, raw) in sorted(stored.items()):
        new = fresh[h][1]
        diff, unmatched = _item_diff(new, raw)
        before, after = stored_scores.get(h, {}), replayed[h]
        same_result = json.dumps(new, sort_keys=True) == json.dumps(raw, sort_keys=True)  # bit-exact, NaN included
        hotkeys[h] = dict(
            model_hash=model_hash, stored_composite=before.get("composite"), replayed_composite=after["composite"],
            stored_gate=before.get("gate"), replayed_gate=after["gate"], stored_rank=before.get("rank"),
            replayed_rank=after["rank"], max_item_diff=diff, unmatched_items=unmatched,
            fingerprint_match=new.get("fingerprint") == raw.get("fingerprint"),
            identical=same_result and (before.get("composite"), before.get("gate"), before.get("rank"))
            == (after["composite"], after["gate"], after["rank"]))
    leader = ranking.leader and ranking.leader.hotkey
    report = dict(round=r.id, sync_block=r.sync_block, seed=r.seed, competition=r.competition, device=device,
                  hotkeys=hotkeys, leader=dict(stored=r.leader, replayed=leader, match=r.leader == leader))
    report["identical"] = report["leader"]["match"] and all(x["identical"] for x in hotkeys.values())
    if out is not None:
        _write(report, results, competition, r.seed, Path(out))
    return report


def _write(report: dict, results: list, competition: Competition, seed: int, out: Path) -> None:
    from eval.report import write_report  # torch, as above

    out.mkdir(parents=True, exist_ok=True)
    for res in results:
        write_report(res, competition, seed, out / res.hotkey)
    (out / "replay.json").write_text(json.dumps(report, sort_keys=True, indent=1) + "\n")


def format_report(report: dict) -> str:
    def f(x):
        return "-" if x is None else f"{x:.6f}"

    lines = [f"round {report['round']}  sync block {report['sync_block']}  seed {report['seed']}  "
             f"device {report['device']}",
             f"{'hotkey':<18} {'stored':>10} {'replayed':>10} {'max diff':>10}  fp    identical"]
    for h, x in report["hotkeys"].items():
        lines.append(f"{h[:16]:<18} {f(x['stored_composite']):>10} {f(x['replayed_composite']):>10} "
                     f"{x['max_item_diff']:>10.3g}  {'same' if x['fingerprint_match'] else 'DIFF':<5} "
                     f"{'yes' if x['identical'] else 'NO'}")
    ld = report["leader"]
    lines.append(f"leader stored {ld['stored']}  replayed {ld['replayed']}  " + ("same" if ld["match"] else "DIFFERENT"))
    return "\n".join(lines)


def replay_command(args) -> int:
    """`quasar eval --replay ROUND`: 0 when every submission replays identically, 1 when any differs,
    2 when the round cannot be replayed."""
    try:
        report = replay_round(args.validator_dir, args.replay, load_competition(args.competition),
                              # auto, as the validator's default: results are bit-identical only on
                              # the device the round ran on
                              device=resolve_device(args.device), progress=not args.quiet, cache_root=args.cache_root,
                              out=args.out)
    except ReplayError as e:
        print(f"quasar eval --replay: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    print(f"wrote {Path(args.out) / 'replay.json'}")
    return 0 if report["identical"] else 1
