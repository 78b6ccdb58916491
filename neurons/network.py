"""Opening the chain and the keys from command-line flags, the same way for miner and validator.

Flags follow bittensor conventions: `--netuid`, `--network` (`finney`, `test`, a ws:// url, or
`local` for the SQLite local chain named by `--chain.path`), `--wallet.name`, `--wallet.hotkey`,
`--wallet.path`. On `local`, keys are localnet mnemonics in `--wallet.path` (created on first use).
"""
from __future__ import annotations

import argparse
from pathlib import Path

# bittensor's default (bittensor.wallet.DEFAULT_WALLET_PATH); not imported here so that parsing the
# command line costs no bittensor import (~0.8 s): a bad flag fails at once
DEFAULT_WALLET_PATH = "~/.bittensor/wallets"


def add_chain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--netuid", type=int, default=24)
    p.add_argument("--network", default="local", help="finney | test | ws://... | local (SQLite local chain)")
    p.add_argument("--chain.path", dest="chain_path", default="localnet/chain.db",
                   help="the local chain's SQLite file (network=local)")
    p.add_argument("--chain.fallback", dest="chain_fallback", action="append", default=None, metavar="URL",
                   help="another ws(s):// endpoint of the same network, tried when --network's is unreachable or "
                        "drops (repeatable; default: the SDK's public pool for finney and test)")
    p.add_argument("--wallet.name", dest="wallet_name", default="default")
    p.add_argument("--wallet.hotkey", dest="wallet_hotkey", default="default")
    p.add_argument("--wallet.path", dest="wallet_path", default=None,
                   help=f"bittensor wallets (default {DEFAULT_WALLET_PATH}); on local, the localnet key directory")


def open_chain(args):
    """(chain, hotkey keypair) for the parsed flags."""
    from neurons.keys import load_wallet, local_keypair

    if args.network == "local":
        from neurons.localchain import LocalChain

        chain = LocalChain(args.chain_path, netuid=args.netuid)
        key_dir = Path(args.wallet_path) if args.wallet_path else Path(args.chain_path).parent / "keys"
        return chain, local_keypair(f"{args.wallet_name}-{args.wallet_hotkey}", key_dir)
    from neurons.subtensor_chain import SubtensorChain

    keys = load_wallet(args.wallet_name, args.wallet_hotkey, args.wallet_path or DEFAULT_WALLET_PATH)
    chain = SubtensorChain(args.network, netuid=args.netuid, wallet=keys,
                           fallback_endpoints=getattr(args, "chain_fallback", None))
    return chain, keys.hotkey


def open_chain_to_read(args):
    """The chain for the parsed flags, without keys: for reads only (`quasar status`)."""
    if args.network == "local":
        from neurons.localchain import LocalChain

        if not Path(args.chain_path).is_file():  # LocalChain would create an empty chain there
            raise ValueError(f"no local chain at {args.chain_path} (--chain.path)")
        return LocalChain(args.chain_path, netuid=args.netuid)
    from neurons.subtensor_chain import SubtensorChain

    return SubtensorChain(args.network, netuid=args.netuid, fallback_endpoints=getattr(args, "chain_fallback", None))
