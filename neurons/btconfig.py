"""btcli's stored defaults (network, wallet), so `quasar miner`/`validator` pick up what an operator
already configured with `btcli config set`.

Read the way btcli itself reads them (bittensor 11, `bittensor.config` and the CLI's options), most
specific first; an explicit flag beats all of them:

    BT_NETWORK, BT_WALLET, BT_WALLET_HOTKEY, BT_WALLET_PATH, BT_FALLBACK_ENDPOINTS   (environment)
    $BTCLI_CONFIG, else ~/.bittensor/btcli.json     keys network, wallet, wallet_hotkey, wallet_path,
                                                    fallback_endpoints (comma-separated; "none")
    ~/.bittensor/config.yml                         the v9 btcli's file (network, chain, wallet_name,
                                                    wallet_hotkey, wallet_path), which btcli 11 ignores
                                                    but operators who set up with v9 still have

Nothing here imports bittensor (~0.8 s): building the command line stays instant. A file that does
not parse is skipped, as btcli skips it: a broken btcli setup must not stop a miner whose flags say
everything.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

# our flag's dest -> (environment variable, btcli.json key, config.yml key)
_KEYS = {
    "network": ("BT_NETWORK", "network", "network"),
    "wallet_name": ("BT_WALLET", "wallet", "wallet_name"),
    "wallet_hotkey": ("BT_WALLET_HOTKEY", "wallet_hotkey", "wallet_hotkey"),
    "wallet_path": ("BT_WALLET_PATH", "wallet_path", "wallet_path"),
    "chain_fallback": ("BT_FALLBACK_ENDPOINTS", "fallback_endpoints", None),
}


def config_paths(env=None) -> tuple[Path, Path]:
    """(btcli 11's JSON file, the v9 btcli's YAML file)."""
    env = os.environ if env is None else env
    home = Path(env.get("HOME") or Path.home())
    return Path(env.get("BTCLI_CONFIG") or home / ".bittensor" / "btcli.json"), home / ".bittensor" / "config.yml"


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        import yaml

        data = yaml.safe_load(path.read_text())
    except Exception:  # noqa: BLE001  yaml's errors, an unreadable file: skipped like a missing one
        return {}
    if not isinstance(data, dict):
        return {}
    if not data.get("network") and isinstance(data.get("chain"), str) and data["chain"].startswith(("ws://", "wss://")):
        data["network"] = data["chain"]  # v9 kept a custom endpoint under `chain`
    return data


def _fallbacks(value) -> list[str] | None:
    if isinstance(value, list):
        return [str(v) for v in value]
    text = str(value).strip()
    if text.lower() == "none":
        return []  # btcli's "pinned to the primary endpoint only"
    return [u.strip() for u in text.split(",") if u.strip()] or None


def btcli_defaults(env=None) -> dict[str, tuple[object, str]]:
    """{dest: (value, where it came from)} for every default btcli's environment or files set."""
    env = os.environ if env is None else env
    json_path, yaml_path = config_paths(env)
    sources = [(f"${name}", {dest: env.get(name)}) for dest, (name, _, _) in _KEYS.items()]
    stored = _read_json(json_path)
    sources.append((str(json_path), {dest: stored.get(key) for dest, (_, key, _) in _KEYS.items()}))
    legacy = _read_yaml(yaml_path)
    sources.append((str(yaml_path), {dest: legacy.get(key) for dest, (_, _, key) in _KEYS.items() if key}))
    out: dict[str, tuple[object, str]] = {}
    for where, values in sources:
        for dest, value in values.items():
            if dest in out or value is None or value == "":
                continue
            value = _fallbacks(value) if dest == "chain_fallback" else str(value)
            if value is not None:
                out[dest] = (value, where)
    return out
