"""Command-line conventions (issue 12): bittensor's flag names, btcli's stored defaults under explicit
flags, `--version`, defaults and help text in `--help`, and the old spellings (`--work-dir`,
`--dir`, `--override`, positional distill overrides) still working with a warning. Parsing only:
nothing here starts a neuron."""
from __future__ import annotations

import argparse
import json

import pytest

from neurons import cli
from neurons.network import DEFAULT_CHAIN_PATH


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A HOME of our own, and none of btcli's environment variables from the machine running the tests."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("BTCLI_CONFIG", "BT_NETWORK", "BT_WALLET", "BT_WALLET_HOTKEY", "BT_WALLET_PATH",
                 "BT_FALLBACK_ENDPOINTS"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / ".bittensor").mkdir()
    return tmp_path


def parse(*argv):
    return cli.build_parser().parse_args(list(argv))


def test_bittensor_flag_names_are_aliases(home):
    a = parse("miner", "--subtensor.network", "test", "--netuid", "7", "--wallet.name", "cold",
              "--wallet.hotkey", "hot", "--wallet.path", "/w")
    assert (a.network, a.netuid, a.wallet_name, a.wallet_hotkey, a.wallet_path) == ("test", 7, "cold", "hot", "/w")
    assert parse("validator", "--network", "test").network == parse("validator", "--subtensor.network", "test").network
    # an endpoint alone: that URL is the network; with a name, the name stays (it picks the competition)
    a = parse("miner", "--subtensor.chain_endpoint", "ws://10.0.0.5:9944")
    assert (a.network, a.chain_endpoint) == ("ws://10.0.0.5:9944", "ws://10.0.0.5:9944")
    a = parse("doctor", "miner", "--subtensor.network", "finney", "--subtensor.chain_endpoint", "wss://my.node:443")
    assert (a.network, a.chain_endpoint) == ("finney", "wss://my.node:443")


def test_localnet_is_the_sqlite_chain_and_local_is_bittensors(home):
    a = parse("miner")
    assert (a.network, a.chain_path, a.wallet_path) == ("localnet", DEFAULT_CHAIN_PATH, None)
    assert parse("miner", "--network", "local").network == "local"  # a subtensor node, as in bittensor


def test_btcli_config_gives_defaults_and_flags_win(home):
    (home / ".bittensor" / "btcli.json").write_text(json.dumps(
        {"network": "test", "wallet": "cold", "wallet_hotkey": "hot", "wallet_path": "/wallets",
         "fallback_endpoints": "wss://a:443, wss://b:443", "json": True}))
    a = parse("miner")
    assert (a.network, a.wallet_name, a.wallet_hotkey, a.wallet_path) == ("test", "cold", "hot", "/wallets")
    assert a.chain_fallback == ["wss://a:443", "wss://b:443"]
    a = parse("validator", "--network", "finney", "--wallet.name", "mine", "--chain.fallback", "wss://c:443")
    assert (a.network, a.wallet_name, a.wallet_hotkey, a.chain_fallback) == ("finney", "mine", "hot", ["wss://c:443"])
    # the SQLite chain keeps its own keys: btcli's wallet defaults are for bittensor networks only
    a = parse("miner", "--network", "localnet")
    assert (a.wallet_name, a.wallet_path, a.chain_fallback) == ("default", None, None)
    miner_help = dict(_subparsers(cli.build_parser()))["miner"].format_help()
    compact = "".join(miner_help.split())  # argparse wraps long paths anywhere
    assert f"(default:test,from{home}/.bittensor/btcli.json)" in compact


def test_btcli_environment_beats_its_files_and_v9_config_is_read_last(home, monkeypatch):
    (home / ".bittensor" / "config.yml").write_text(
        "network: null\nchain: ws://10.9.9.9:9944\nwallet_name: legacy\nwallet_hotkey: lhot\nwallet_path: /old\n")
    a = parse("miner")
    assert (a.network, a.wallet_name, a.wallet_hotkey, a.wallet_path) == ("ws://10.9.9.9:9944", "legacy", "lhot", "/old")
    (home / ".bittensor" / "btcli.json").write_text(json.dumps({"wallet": "new"}))
    monkeypatch.setenv("BT_NETWORK", "test")
    a = parse("miner")
    assert (a.network, a.wallet_name, a.wallet_hotkey) == ("test", "new", "lhot")
    monkeypatch.setenv("BTCLI_CONFIG", str(home / "elsewhere.json"))  # btcli's own override of the file
    (home / "elsewhere.json").write_text("{broken")  # skipped, as btcli skips it
    assert parse("miner").wallet_name == "legacy"


def test_version_and_defaults_in_help(home, capsys):
    with pytest.raises(SystemExit) as e:
        parse("--version")
    assert e.value.code == 0 and capsys.readouterr().out.startswith("quasar ")
    with pytest.raises(SystemExit):
        parse("validator", "--help")
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 24)" in text and "(default: 500.0)" in text and "(default: validator)" in text
    assert "(default: None)" not in text and "(default: False)" not in text


def _subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                yield from ((f"{name} {n}", s) for n, s in _subparsers(sub))


def test_every_flag_of_every_command_has_help(home):
    missing = [f"{name} {action.option_strings[0]}" for name, sub in _subparsers(cli.build_parser())
               for action in sub._actions
               if action.option_strings and not isinstance(action, argparse._HelpAction) and not action.help]
    assert missing == []


def test_old_spellings_still_work_with_a_warning(home, tmp_path, capsys):
    a = parse("miner", "--work-dir", "w", "--override", "steps=3", "--set", "log_every=1")
    assert a.work_dir == "w" and a.override == ["steps=3", "log_every=1"]
    assert a.deprecations == ["--work-dir is deprecated; use --out", "--override is deprecated; use --set"]
    assert parse("validator", "--out", "v").work_dir == "v" and not getattr(parse("validator"), "deprecations", None)
    assert parse("localnet", "--dir", "d").out == "d"
    # distill's positional overrides: applied, and a warning before the (here: missing) config's error
    assert cli.main(["distill", str(tmp_path / "nosuch.json"), "steps=3"]) == 2
    err = capsys.readouterr().err.splitlines()
    warning = json.loads(err[0])
    assert (warning["level"], warning["event"], warning["detail"]) == \
           ("warning", "deprecated flag", "positional key=value overrides are deprecated; use --set key=value")
    assert len(err) == 2 and "error:" in err[1]



def test_localnet_reuses_only_its_own_run_directory(tmp_path):
    from neurons.localnet import MARKER, claim_run_dir

    run = tmp_path / "run"
    claim_run_dir(run, fresh=True)  # new: created, marked
    (run / "chain.db").write_text("state")
    claim_run_dir(run, fresh=False)  # --keep: kept
    assert (run / "chain.db").exists() and (run / MARKER).exists()
    claim_run_dir(run, fresh=True)  # a fresh run empties its own directory
    assert sorted(p.name for p in run.iterdir()) == [MARKER]
    old = tmp_path / "old"  # a run directory from before the marker: chain.db and keys/
    (old / "keys").mkdir(parents=True)
    (old / "chain.db").write_text("state")
    claim_run_dir(old, fresh=False)
    assert (old / "chain.db").read_text() == "state" and (old / MARKER).exists()
    (tmp_path / "empty").mkdir()
    claim_run_dir(tmp_path / "empty", fresh=True)
    with pytest.raises(ValueError, match="was not created by quasar localnet"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "x").write_text("x")
        claim_run_dir(tmp_path / "other", fresh=True)
    assert (tmp_path / "other" / "x").exists()


def test_a_neuron_logs_its_deprecated_flags_as_json(home, tmp_path, capsys):
    rc = cli.main(["miner", "--network", "finney", "--competition", "localnet", "--work-dir", str(tmp_path / "w"),
                   "--override", "steps=1"])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and err[-1].startswith("quasar miner: error: preflight competition")  # refused, as before
    events = [json.loads(line) for line in err[:-1]]
    assert [(e["level"], e["event"], e["detail"]) for e in events] == [
        ("warning", "deprecated flag", "--work-dir is deprecated; use --out"),
        ("warning", "deprecated flag", "--override is deprecated; use --set")]
    assert not (tmp_path / "w").exists()
