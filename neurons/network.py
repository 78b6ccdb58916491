"""Opening the chain and the keys from command-line flags, the same way for miner and validator.

Flags follow bittensor conventions: `--netuid`, `--network`/`--subtensor.network` (`finney`,
`test`, `local` = a subtensor node at ws://127.0.0.1:9944, a ws:// url), `--subtensor.chain_endpoint`,
`--wallet.name`, `--wallet.hotkey`, `--wallet.path`; their defaults come from btcli's config
(neurons.btconfig) when it sets them. `--network localnet` is this toolkit's SQLite local chain,
named by `--chain.path`, with keys in `--wallet.path` (localnet mnemonics, created on first use).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from neurons.btconfig import btcli_defaults
from neurons.cliparse import after_parse

# bittensor's default (bittensor.wallet.DEFAULT_WALLET_PATH); not imported here so that parsing the
# command line costs no bittensor import (~0.8 s): a bad flag fails at once
DEFAULT_WALLET_PATH = "~/.bittensor/wallets"
LOCALNET = "localnet"  # the SQLite chain; `local` keeps bittensor's meaning
BITTENSOR_LOCAL = "local"
DEFAULT_CHAIN_PATH = "localnet/chain.db"
OLD_LOCAL_HINT = ("`--network local` is bittensor's local subtensor node (ws://127.0.0.1:9944); this toolkit's "
                  "SQLite local chain is `--network localnet`")


def add_chain_args(p: argparse.ArgumentParser) -> None:
    # btcli's defaults apply to bittensor networks only: on localnet a wallet name from btcli's config
    # must not send the toolkit's own keys into the operator's wallet directory
    found = btcli_defaults()

    def shown(dest: str, builtin) -> str:
        if dest in found:
            value, where = found[dest]
            return f" (default: {value}, from {where})"
        return f" (default: {builtin})" if builtin is not None else ""

    p.add_argument("--netuid", type=int, default=24, help="subnet uid")
    p.add_argument("--network", "--subtensor.network", dest="network", default=None,
                   help="finney | test | local (a subtensor node at ws://127.0.0.1:9944) | ws(s)://URL | "
                        "localnet (this toolkit's SQLite local chain)" + shown("network", LOCALNET))
    p.add_argument("--subtensor.chain_endpoint", dest="chain_endpoint", default=None, metavar="URL",
                   help="ws(s):// endpoint to dial instead of --network's own (bittensor's flag); the network "
                        "name still picks the default competition")
    p.add_argument("--chain.path", dest="chain_path", default=None, metavar="PATH",
                   help=f"the SQLite local chain's file (--network localnet; default {DEFAULT_CHAIN_PATH})")
    p.add_argument("--chain.fallback", dest="chain_fallback", action="append", default=None, metavar="URL",
                   help="another ws(s):// endpoint of the same network, tried when --network's is unreachable or "
                        "drops (repeatable; default: the SDK's public pool for finney and test)"
                        + shown("chain_fallback", None))
    p.add_argument("--wallet.name", dest="wallet_name", default=None, metavar="NAME",
                   help="coldkey wallet name" + shown("wallet_name", "default"))
    p.add_argument("--wallet.hotkey", dest="wallet_hotkey", default=None, metavar="NAME",
                   help="hotkey name in the wallet" + shown("wallet_hotkey", "default"))
    p.add_argument("--wallet.path", dest="wallet_path", default=None, metavar="DIR",
                   help=f"bittensor wallets (default {DEFAULT_WALLET_PATH}); on localnet, the localnet key "
                        "directory (default: keys/ next to --chain.path)" + shown("wallet_path", None))
    after_parse(p, lambda args: resolve_chain_args(args, found))


def resolve_chain_args(args, btcli: dict | None = None) -> None:
    """Fill in the defaults (explicit flags, then btcli's config, then ours) and refuse flags that
    only make sense together: ValueError (a usage error) naming the conflict."""
    btcli = btcli_defaults() if btcli is None else btcli
    endpoint = getattr(args, "chain_endpoint", None)
    if args.network is None:
        args.network = btcli["network"][0] if "network" in btcli else endpoint or LOCALNET
    if endpoint is not None and not endpoint.startswith(("ws://", "wss://")):
        raise ValueError(f"--subtensor.chain_endpoint {endpoint!r}: expected a ws:// or wss:// URL")
    if endpoint is not None and args.network == LOCALNET:
        raise ValueError("--subtensor.chain_endpoint names a subtensor node; --network localnet is the SQLite "
                         "local chain: pass --network finney|test|local with it")
    if args.chain_path is not None and args.network != LOCALNET:
        hint = f" ({OLD_LOCAL_HINT})" if args.network == BITTENSOR_LOCAL else ""
        raise ValueError(f"--chain.path is the SQLite local chain's file: pass --network localnet with it{hint}")
    if args.chain_path is None:
        args.chain_path = DEFAULT_CHAIN_PATH
    real = args.network != LOCALNET
    for dest, builtin in (("wallet_name", "default"), ("wallet_hotkey", "default"), ("wallet_path", None),
                          ("chain_fallback", None)):
        if getattr(args, dest, None) is None:
            setattr(args, dest, btcli[dest][0] if real and dest in btcli else builtin)


def open_chain(args):
    """(chain, hotkey keypair) for the parsed flags."""
    # the keys and both chains load bittensor (~0.5-0.9 s): imported here, not at the top, which the
    # command-line parser imports
    from neurons.keys import load_wallet, local_keypair

    if args.network == LOCALNET:
        from neurons.localchain import LocalChain

        chain = LocalChain(args.chain_path, netuid=args.netuid)
        key_dir = Path(args.wallet_path) if args.wallet_path else Path(args.chain_path).parent / "keys"
        return chain, local_keypair(f"{args.wallet_name}-{args.wallet_hotkey}", key_dir)
    from neurons.subtensor_chain import SubtensorChain

    keys = load_wallet(args.wallet_name, args.wallet_hotkey, args.wallet_path or DEFAULT_WALLET_PATH)
    chain = SubtensorChain(getattr(args, "chain_endpoint", None) or args.network, netuid=args.netuid, wallet=keys,
                           fallback_endpoints=getattr(args, "chain_fallback", None))
    return chain, keys.hotkey


def open_chain_to_read(args):
    """The chain for the parsed flags, without keys: for reads only (`quasar status`). Imports here,
    as in open_chain."""
    if args.network == LOCALNET:
        from neurons.localchain import LocalChain

        if not Path(args.chain_path).is_file():  # LocalChain would create an empty chain there
            raise ValueError(f"no local chain at {args.chain_path} (--chain.path)")
        return LocalChain(args.chain_path, netuid=args.netuid)
    from neurons.subtensor_chain import SubtensorChain

    return SubtensorChain(getattr(args, "chain_endpoint", None) or args.network, netuid=args.netuid,
                          fallback_endpoints=getattr(args, "chain_fallback", None))
