"""Keys for the two networks.

- Real network: `load_wallet` opens an existing bittensor wallet read-only. Neurons sign with the
  hotkey and only need the coldkey's *public* half, so the (usually encrypted) coldkey is never
  unlocked here and nothing on disk is created or rewritten.
- Localnet: `local_keypair` gives each participant a persistent sr25519 key of its own, created
  on first use and identical on every reload, so restarts keep their uid and commitments.
"""
from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from bittensor.sp_core import Keypair
from bittensor.wallet import DEFAULT_WALLET_PATH, Wallet

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class WalletKeys:
    """An opened wallet: the hotkey that signs, and the coldkey's public half."""

    wallet: Wallet  # still gives `wallet.coldkey` (prompts to decrypt) to the rare caller needing it
    hotkey: Keypair
    coldkeypub: Keypair

    @property
    def hotkey_ss58(self) -> str:
        return self.hotkey.ss58_address

    @property
    def coldkey_ss58(self) -> str:
        return self.coldkeypub.ss58_address


def load_wallet(name: str, hotkey: str = "default", path: str | os.PathLike = DEFAULT_WALLET_PATH) -> WalletKeys:
    """Open `<path>/<name>` with hotkey `hotkey`. Loads eagerly so a missing or unreadable key
    fails at startup, not at the first weight write an hour later."""
    wallet = Wallet(name=name, hotkey=hotkey, path=str(Path(path).expanduser()))
    for keyfile in (wallet.hotkey_file, wallet.coldkeypub_file):
        if not keyfile.exists_on_device():
            raise FileNotFoundError(f"{wallet}: no keyfile at {keyfile.path}; create it with btcli first")
    return WalletKeys(wallet=wallet, hotkey=wallet.hotkey, coldkeypub=wallet.coldkeypub)


def local_keypair(name: str, directory: str | os.PathLike) -> Keypair:
    """The localnet key called `name`, from `<directory>/<name>.mnemonic` (created 0600 on first use).

    Creation is race-free: the file is written complete under a temporary name and hard-linked
    into place, so two processes asking for the same new key at once end up with the same key and
    no reader ever sees a half-written file.
    """
    if not _NAME.match(name):
        raise ValueError(f"bad key name {name!r}: letters, digits, '_', '.', '-' only")
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / f"{name}.mnemonic"
    if not path.exists():
        _create_secret_file(path, Keypair.generate_mnemonic(12))
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        # Like ssh: a secret others can read is treated as leaked, not silently used.
        raise PermissionError(f"{path} has mode {oct(mode)}; it holds a secret key and must be 0600")
    return Keypair.create_from_mnemonic(path.read_text().strip())


def _create_secret_file(path: Path, secret: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the create mode is filtered by umask; this is not
        os.write(fd, (secret + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # atomic and refuses to overwrite: the first creator wins
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
