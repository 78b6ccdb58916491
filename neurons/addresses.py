"""Which network addresses a validator may connect to on a miner's behalf.

A miner names hosts (an `http` commitment) and, through the Hub's redirects, URLs; either could
point a validator at its own machine or network (cloud metadata at 169.254.169.254, an admin
port on 10.x). `address_problem` says why an address is refused, or None for a public one.

IPv6 needs more than `ipaddress`'s `is_global`: several IPv6 forms carry an IPv4 address that
the network delivers to, and `is_global` calls them public whatever IPv4 address they carry:

    ::ffff:a.b.c.d        IPv4-mapped: the IPv4 address itself
    ::a.b.c.d             IPv4-compatible (deprecated since RFC 4291): refused outright
    64:ff9b::/96          NAT64 well-known prefix: a gateway forwards to the embedded IPv4
    64:ff9b:1::/48        NAT64 local-use prefix (RFC 8215): site-specific, refused
    2002::/16             6to4: the embedded IPv4 is the relay's destination
    2001::/32             Teredo: not global, refused

An embedded IPv4 address must be public itself.
"""
from __future__ import annotations

import ipaddress
import socket

import aiohttp
from aiohttp.abc import AbstractResolver

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


def _v4_problem(address: ipaddress.IPv4Address, shown: str) -> str | None:
    if not address.is_global or address.is_multicast:
        return f"{shown} is not a public address"
    return None


def address_problem(text: str) -> str | None:
    """None when `text` (an IP literal, as a resolver returns it) is a public unicast address;
    otherwise why not, naming the address."""
    if "%" in text:  # a zone id only means something for link-local addresses
        return f"{text} is a scoped (link-local) address, not a public one"
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return f"{text!r} is not an IP address"
    if address.version == 4:
        return _v4_problem(address, str(address))
    if address.ipv4_mapped is not None:
        return _v4_problem(address.ipv4_mapped, f"{address} (IPv4-mapped {address.ipv4_mapped})")
    if address in _IPV4_COMPATIBLE:  # also :: and ::1
        return f"{address} is an IPv4-compatible or unspecified IPv6 address, which is refused"
    if address in _NAT64_LOCAL:
        return f"{address} is in the local-use NAT64 prefix 64:ff9b:1::/48, which is refused"
    if address in _NAT64:
        embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        return _v4_problem(embedded, f"{address} (NAT64 for {embedded})")
    if address.sixtofour is not None:
        return _v4_problem(address.sixtofour, f"{address} (6to4 for {address.sixtofour})")
    if address.teredo is not None:
        return f"{address} is a Teredo address, which is refused"
    if not address.is_global or address.is_multicast:
        return f"{address} is not a public address"
    return None


class PublicResolver(AbstractResolver):
    """An aiohttp resolver that refuses a name if any address it resolves to is not public.

    All of them, not the public ones only: a name answering both a public and a private address
    is an attempt, and the connection goes to exactly the addresses checked here (no second
    lookup for the name to rebind between). IP literals never reach a resolver: check those
    with `address_problem` before the request.
    """

    def __init__(self):
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET):
        try:
            infos = await self._inner.resolve(host, port, family)
        except OSError as e:
            raise OSError(f"{host!r} cannot be resolved: {e.strerror or e}") from None
        for info in infos:
            problem = address_problem(info["host"])
            if problem:
                raise RefusedAddress(f"{host!r} resolves to a refused address: {problem}")
        return infos

    async def close(self) -> None:
        await self._inner.close()


class RefusedAddress(OSError):
    """A name resolved to an address a validator must not connect to."""
