"""`quasar eval --replay ROUND`: a stored validator round re-evaluated offline matches its record.

One real round on a local chain (three models and an exact copy), then replays of it through the
CLI: untouched it replays bit-identically; a tampered stored result, a wrong competition file, a
missing round or a missing checkpoint are each reported by name.
"""
import json
import shutil
import sqlite3

import pytest
from test_validator import _subnet_with_copier, models, quick_competition  # noqa: F401  models: the module fixture

from eval.cli import main as eval_main
from eval.competition import load_competition
from neurons.cli import main
from neurons.validator import Validator


@pytest.fixture(scope="module")
def scored(tmp_path_factory, models):  # noqa: F811
    tmp = tmp_path_factory.mktemp("replay")
    net, owners = _subnet_with_copier(tmp, models, competition=quick_competition())  # replays check equality, not values
    work = tmp / "v"
    (work / "submissions").mkdir(parents=True, exist_ok=True)  # fetch wants the destination's parent to exist
    v = Validator(net.chain, net.validator, net.competition, net.settings(work))
    # one round driven directly: run() would wait for another round if this one scored nothing
    assert v.run_round(v.next_round())
    assert len(v.state.scores(1)) == len(owners), v.state.submissions("rejected")
    v.state.close()
    return net, owners, work


def _replay(net, work, out, *extra, competition=None):
    return main(["eval", "--replay", "1", "--validator-dir", str(work), "--competition",
                 str(competition or net.competition_path), "--out", str(out), "--quiet", *extra])


def _copy_state(work, dest):
    """The validator's database alone (WAL included), through SQLite's backup."""
    dest.mkdir()
    src, dst = sqlite3.connect(work / "validator.db"), sqlite3.connect(dest / "validator.db")
    src.backup(dst)
    src.close()
    return dst


@pytest.mark.slow
def test_replay_reproduces_the_round_and_a_tampered_result_is_caught(scored, tmp_path, capsys):
    net, owners, work = scored
    assert _replay(net, work, tmp_path / "out") == 0
    report = json.loads((tmp_path / "out" / "replay.json").read_text())
    assert report["round"] == 1 and report["identical"]
    assert set(report["hotkeys"]) == set(owners.values())
    for h, x in report["hotkeys"].items():
        assert x["identical"] and x["fingerprint_match"] and x["max_item_diff"] == 0, (h, x)
        assert x["stored_composite"] == x["replayed_composite"]
        assert (tmp_path / "out" / h / "report.json").is_file()
    # the copy and its original were committed in one block: one of the two (by hotkey order) is gated
    assert [report["hotkeys"][owners[n]]["replayed_gate"] for n in ("a", "copier")].count("exact_copy") == 1
    # no leader at all is possible (the round's random seed can make every tiny model degenerate)
    assert report["leader"]["match"] and report["leader"]["stored"] == report["leader"]["replayed"]
    assert "identical" in capsys.readouterr().out

    # one item value of one stored result changed after the fact
    victim = owners["b"]
    tampered = tmp_path / "tampered"
    db = _copy_state(work, tampered)
    raw = json.loads(db.execute("SELECT result FROM results WHERE round_id = 1 AND hotkey = ?", (victim,)).fetchone()[0])
    item = next(i for i in raw["items"] if i["axis"] == "kl")
    item["value"] += 0.25
    db.execute("UPDATE results SET result = ? WHERE round_id = 1 AND hotkey = ?", (json.dumps(raw), victim))
    db.commit()
    db.close()
    assert _replay(net, tampered, tmp_path / "out2") == 1
    report = json.loads((tmp_path / "out2" / "replay.json").read_text())
    assert not report["identical"]
    assert not report["hotkeys"][victim]["identical"]
    assert report["hotkeys"][victim]["max_item_diff"] == pytest.approx(0.25)
    assert report["hotkeys"][victim]["fingerprint_match"]
    assert all(x["identical"] for h, x in report["hotkeys"].items() if h != victim)


def test_a_round_that_cannot_be_replayed_says_why(scored, tmp_path, capsys):
    net, owners, work = scored
    raw = json.loads(net.competition_path.read_text())
    raw["score"]["margin"] += 0.01
    other = tmp_path / "other.json"
    other.write_text(json.dumps(raw))
    assert _replay(net, work, tmp_path / "out", competition=other) == 2
    err = capsys.readouterr().err
    assert net.competition.digest in err and load_competition(other).digest in err

    assert main(["eval", "--replay", "7", "--validator-dir", str(work), "--competition",
                 str(net.competition_path), "--out", str(tmp_path / "out")]) == 2
    assert "round 7 is not in" in capsys.readouterr().err

    gone = tmp_path / "gone"
    db = _copy_state(work, gone)
    db.execute("UPDATE submissions SET path = ? WHERE hotkey = ?", (str(tmp_path / "deleted"), owners["c"]))
    db.commit()
    db.close()
    shutil.rmtree(tmp_path / "deleted", ignore_errors=True)
    assert _replay(net, gone, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert owners["c"] in err and "deleted is gone" in err and "cannot be replayed completely" in err


def test_eval_takes_exactly_one_of_checkpoint_or_replay(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["eval"])
    assert "exactly one of CHECKPOINT" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", str(tmp_path), "--replay", "1"])
    assert "exactly one of CHECKPOINT" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # eval's own entry has no replay: unchanged, CHECKPOINT required
        eval_main(["eval", "--replay", "1"])
