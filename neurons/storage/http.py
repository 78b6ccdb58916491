"""Storage kind `http`: the miner's own `CheckpointServer` (neurons.serve), every request signed."""
from __future__ import annotations

import asyncio
import socket
from contextlib import asynccontextmanager
from pathlib import Path

import yarl

from ..addresses import address_problem
from ..commitment import Commitment
from ..manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest, ManifestEntry
from .core import Budget, FetchLimits, Hops, Net, Pace, Sink, client_session, reject


# ================================================================================== publish
def stage(directory: Path, manifest: Manifest, *, hotkey: str, token: str, server=None, host=None, port=None,
          **_other_kinds) -> Commitment:
    """Nothing to copy: the server reads `directory`, once `release` registers it."""
    if server is None:
        raise ValueError("publishing 'http' needs the miner's CheckpointServer")
    host, port = host or server.host, port or server.port
    if host in ("0.0.0.0", "") or not port:
        raise ValueError(f"give the public host and port validators reach the server at (not {host!r}:{port})")
    return Commitment.for_model("http", f"{host}:{port}", token, manifest.model_hash, hotkey)


def release(commitment: Commitment, directory: Path, *, server=None, **_other_kinds) -> None:
    if server is None:
        raise ValueError("releasing 'http' needs the miner's CheckpointServer")
    server.register(commitment.revision, directory)


# ================================================================================== fetch
class HttpSource:
    """The miner's CheckpointServer; every request signed for the miner's hotkey."""

    def __init__(self, net: Net, commitment: Commitment, keypair, miner_hotkey: str | None, base: str):
        if keypair is None or not miner_hotkey:
            raise ValueError("fetching an 'http' commitment needs the validator's keypair and the miner's hotkey")
        self.net, self.keypair, self.miner_hotkey = net, keypair, miner_hotkey
        self.base, self.host = base, commitment.location
        self.prefix = f"/checkpoint/{commitment.revision}/"  # token and names are grammar-checked ASCII

    def _get(self, name: str, sink: Sink):
        from bittensor import http_auth

        path = self.prefix + name
        headers = http_auth.sign(self.keypair, method="GET", path=path, receiver_ss58=self.miner_hotkey)
        headers.update({"Host": self.host, "Accept-Encoding": "identity"})
        return self.net.get(self.base + path, headers, sink)

    async def manifest(self, budget: Budget) -> bytes:
        sink = Sink("manifest.json", MAX_MANIFEST_BYTES, budget)
        await self._get(MANIFEST_NAME, sink)
        return sink.content()

    def check_listing(self, manifest: Manifest) -> None:
        pass  # the server has no listing: only the manifest's names are ever asked for

    async def download(self, entry: ManifestEntry, sink: Sink) -> None:
        await self._get(entry.name, sink)


async def _http_base(commitment: Commitment, localnet: bool, limits: FetchLimits) -> str:
    """`http://ip:port` to connect to. Off localnet, every address the name resolves to must be
    public, and the connection goes to the checked address (no second lookup to rebind)."""
    host, port = commitment.host, commitment.port
    if localnet:
        return f"http://{host}:{port}"
    try:
        async with asyncio.timeout(limits.connect_timeout):
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError) as e:
        raise reject(f"http host {host!r} cannot be resolved ({type(e).__name__})") from None
    addresses = [info[4][0] for info in infos]
    for address in addresses:
        problem = address_problem(address)
        if problem:
            raise reject(f"http host {host!r} resolves to a refused address: {problem}")
    if not addresses:
        raise reject(f"http host {host!r} resolves to no address")
    first = sorted(addresses, key=lambda a: ":" in a)[0]  # IPv4 first
    return f"http://[{first}]:{port}" if ":" in first else f"http://{first}:{port}"


@asynccontextmanager
async def open_source(commitment: Commitment, limits: FetchLimits, *, localnet: bool, miner_hotkey: str,
                      keypair=None, **_other_kinds):
    async with client_session(limits, localnet) as session:
        pace = Pace(limits)
        base = await _http_base(commitment, localnet, limits)
        # No redirects from a miner's server: it has no reason to send one.
        net = Net(session, limits, pace, Hops(yarl.URL(base), localnet, follow=False))
        yield HttpSource(net, commitment, keypair, miner_hotkey, base)
