"""The on-chain commitment: a compact, versioned string naming where a checkpoint lives.

Grammar (version 2), ASCII only, at most 128 bytes, fields separated by ':'::

    commitment := "q2" ":" body
    body       := "hf"    ":" repo_id     ":" git_sha ":" binding
                | "http"  ":" host ":" port ":" token   ":" binding
                | "local" ":" path        ":" token   ":" binding

    repo_id  := part "/" part          Hugging Face rules per part: [A-Za-z0-9._-], 1-96 chars,
                                       no leading/trailing '-' or '.', no "--" or "..", no ".git"
                                       ending; the whole id at most 48 chars (the byte budget)
    git_sha  := 40 lowercase hex       a full commit sha: the revision is pinned, not a branch
    host     := IPv4 dotted quad (decimal, no leading zeros) | lowercase RFC 1123 hostname
    port     := 1..65535, decimal, no leading zeros       (host ":" port at most 60 chars)
    path     := seg ("/" seg)*, seg := [A-Za-z0-9][A-Za-z0-9._-]*, no "..", at most 60 chars;
                relative to the validator's localnet storage root, never absolute
    token    := [A-Za-z0-9][A-Za-z0-9._-]{0,23}
    binding  := 32 lowercase hex       the first 128 bits of sha256(model_hash || hotkey): the
                                       manifest's 64-hex model_hash, then the committing hotkey's
                                       ss58 address, as ASCII

Why a binding and not the model hash itself (version 1 committed a bare hash prefix): the
commitment names the model without revealing it, and only for the hotkey that committed it. A
copier reading a pending or landed commitment learns nothing it could commit under its own
hotkey: the same string from another hotkey fails the check, and the weights stay unknown until
the miner publishes them, which it does only after its commitment has landed (neurons.miner).
So the earliest block a copy can land in is the one after its source's, which is what makes
"the earliest commitment of a hash owns it" safe.

Why 32 hex characters: the worst case (`hf` with a 48-char repo id and a 40-char sha) must fit
128 bytes, and 6 + 48 + 1 + 40 + 1 + 32 = 128 exactly. 128 bits keeps a second preimage (another
checkpoint or hotkey matching someone's binding) at 2^128 work. A colliding pair of one's own
checkpoints costs 2^64; that only lets a miner serve different bytes to different validators over
`http`, which the validator-side checks treat like any other submission. The fetched manifest's
full hash is bound again and compared.

Every string has one accepted spelling (lowercase hex and hosts, no leading zeros), so
`encode_commitment(parse_commitment(s)) == s` and "earliest commitment of a hash" cannot be
dodged by re-spelling. IPv6 is not supported: its ':' would collide with the separator.

`parse_commitment(s)` is for mainnet/testnet by default: it refuses `local` and http hosts that
are not public (loopback, private, link-local, `localhost`, single-label names), so a commitment
cannot point a validator at its own machine or network. Pass `localnet=True` to allow them.
A hostname can still resolve to a private address: the HTTP fetcher must check the resolved IP.
"""
from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass

from neurons.chain import MAX_COMMITMENT_BYTES

VERSION = "q2"
RETIRED_VERSIONS = {"q1": "version 1 committed a bare model hash, which a copier could commit as its own"}
KINDS = ("hf", "http", "local")
BINDING_HEX = 32
SEPARATOR = ":"

MAX_HF_REPO_ID = 48
MAX_HOST_PORT = 60
MAX_LOCAL_PATH = 60
MAX_TOKEN = 24

_HEX40 = re.compile(r"[0-9a-f]{40}")
_BINDING = re.compile(rf"[0-9a-f]{{{BINDING_HEX}}}")
_TOKEN = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_TOKEN - 1}}}")
_HF_PART = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")
_HOST_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_PATH_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_PORT = re.compile(r"[1-9][0-9]{0,4}")
_LOCAL_HOSTNAME_SUFFIXES = (".localhost", ".local", ".internal", ".localdomain", ".home.arpa")

# The grammar's length caps must fit the byte budget in the worst case of every kind.
_WORST_CASE = {
    "hf": len(f"{VERSION}:hf:") + MAX_HF_REPO_ID + 1 + 40 + 1 + BINDING_HEX,
    "http": len(f"{VERSION}:http:") + MAX_HOST_PORT + 1 + MAX_TOKEN + 1 + BINDING_HEX,
    "local": len(f"{VERSION}:local:") + MAX_LOCAL_PATH + 1 + MAX_TOKEN + 1 + BINDING_HEX,
}
assert max(_WORST_CASE.values()) <= MAX_COMMITMENT_BYTES, _WORST_CASE
assert BINDING_HEX * 4 >= 128
_HEX64 = re.compile(r"[0-9a-f]{64}")


def binding(model_hash: str, hotkey: str) -> str:
    """The commitment's model field: sha256(model_hash || hotkey), first BINDING_HEX hex digits."""
    if not isinstance(model_hash, str) or not _HEX64.fullmatch(model_hash):
        raise ValueError(f"model_hash must be 64 lowercase hex characters, got {str(model_hash)[:70]!r}")
    if not isinstance(hotkey, str) or not hotkey or not hotkey.isascii():
        raise ValueError(f"hotkey must be a non-empty ASCII ss58 address, got {str(hotkey)[:70]!r}")
    return hashlib.sha256((model_hash + hotkey).encode("ascii")).hexdigest()[:BINDING_HEX]


class CommitmentRejected(Exception):
    """A commitment string that does not follow the grammar; `reason` says which part and why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Commitment:
    kind: str  # "hf" | "http" | "local"
    location: str  # "owner/name" | "host:port" | relative path
    revision: str  # 40-hex git sha for hf, a short token otherwise
    binding: str  # binding(model_hash, hotkey): the model, for the committing hotkey only

    @classmethod
    def for_model(cls, kind: str, location: str, revision: str, model_hash: str, hotkey: str) -> "Commitment":
        """Build from the full 64-hex model hash of a manifest and the hotkey that will commit it."""
        return cls(kind, location, revision, binding(model_hash, hotkey))

    def matches(self, model_hash: str, hotkey: str) -> bool:
        """Whether `hotkey` committing this names the manifest whose full model hash is `model_hash`."""
        try:
            return binding(model_hash, hotkey) == self.binding
        except ValueError:
            return False

    @property
    def host(self) -> str:
        return self.location.rsplit(SEPARATOR, 1)[0] if self.kind == "http" else ""

    @property
    def port(self) -> int:
        return int(self.location.rsplit(SEPARATOR, 1)[1]) if self.kind == "http" else 0


def unbound_reason(model_hash: str, commitment: Commitment, hotkey: str) -> str:
    """Why a manifest is not the one `hotkey`'s commitment names (no byte of the miner's text)."""
    return (f"manifest model_hash {model_hash[:16]}... bound to hotkey {hotkey[:16]} is "
            f"{binding(model_hash, hotkey)}, not the committed {commitment.binding} "
            "(another checkpoint, or a commitment copied from another hotkey)")


def _show(value: str) -> str:
    return repr(value if len(value) <= 60 else value[:60] + "...")


# ---------------------------------------------------------------------------------- fields
def _check_hf_repo_id(location: str) -> None:
    if len(location) > MAX_HF_REPO_ID:
        raise CommitmentRejected(f"hf repo id {_show(location)} is longer than {MAX_HF_REPO_ID} characters")
    parts = location.split("/")
    if len(parts) != 2:
        raise CommitmentRejected(f"hf repo id {_show(location)} must be 'owner/name'")
    for part in parts:
        if not _HF_PART.fullmatch(part) or "--" in part or ".." in part:
            raise CommitmentRejected(
                f"hf repo id {_show(location)}: {part!r} breaks the Hub naming rules "
                "([A-Za-z0-9._-], no leading/trailing '-' or '.', no '--' or '..')")
    if location.endswith(".git"):
        raise CommitmentRejected(f"hf repo id {_show(location)} may not end with '.git'")


def _check_host(host: str, localnet: bool) -> None:
    if re.fullmatch(r"[0-9.]+", host):  # numeric: must be an exact IPv4 dotted quad
        octets = host.split(".")
        if len(octets) != 4 or any(not o or len(o) > 3 or (len(o) > 1 and o[0] == "0") or int(o) > 255
                                   for o in octets):
            raise CommitmentRejected(f"http host {_show(host)} is not a canonical IPv4 address")
        if not localnet and not ipaddress.IPv4Address(host).is_global:
            raise CommitmentRejected(f"http host {_show(host)} is not a public address (allowed on localnet only)")
        return
    labels = host.split(".")
    if not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise CommitmentRejected(f"http host {_show(host)} is not a lowercase hostname or IPv4 address")
    if labels[-1].isdigit():
        raise CommitmentRejected(f"http host {_show(host)} has a numeric top-level label")
    if not localnet and (len(labels) < 2 or host == "localhost" or host.endswith(_LOCAL_HOSTNAME_SUFFIXES)):
        raise CommitmentRejected(f"http host {_show(host)} is a local name (allowed on localnet only)")


def _check_host_port(location: str, localnet: bool) -> None:
    if len(location) > MAX_HOST_PORT:
        raise CommitmentRejected(f"http location {_show(location)} is longer than {MAX_HOST_PORT} characters")
    host, _, port = location.rpartition(SEPARATOR)
    _check_host(host, localnet)
    if not _PORT.fullmatch(port) or int(port) > 65535:
        raise CommitmentRejected(f"http port {_show(port)} is not a decimal number in 1..65535")


def _check_local_path(location: str) -> None:
    if len(location) > MAX_LOCAL_PATH:
        raise CommitmentRejected(f"local path {_show(location)} is longer than {MAX_LOCAL_PATH} characters")
    if ".." in location:
        raise CommitmentRejected(f"local path {_show(location)} contains '..'")
    if not all(_PATH_SEGMENT.fullmatch(seg) for seg in location.split("/")):
        raise CommitmentRejected(
            f"local path {_show(location)} must be relative segments of [A-Za-z0-9._-] starting alphanumeric")


def _check_revision(kind: str, revision: str) -> None:
    if kind == "hf":
        if not _HEX40.fullmatch(revision):
            raise CommitmentRejected(f"hf revision {_show(revision)} is not a 40-character lowercase hex commit sha")
    elif not _TOKEN.fullmatch(revision):
        raise CommitmentRejected(
            f"{kind} revision {_show(revision)} is not a token of 1-{MAX_TOKEN} [A-Za-z0-9._-] starting alphanumeric")


def _check_binding(value: str) -> None:
    if not _BINDING.fullmatch(value):
        raise CommitmentRejected(f"model binding {_show(value)} is not {BINDING_HEX} lowercase hex characters")


# ---------------------------------------------------------------------------------- parse
def _as_text(raw: str | bytes) -> str:
    """Length cap first (cheap, bounds everything after), then strict UTF-8, then the alphabet."""
    if isinstance(raw, (bytes, bytearray)):
        if len(raw) > MAX_COMMITMENT_BYTES:
            raise CommitmentRejected(f"commitment is {len(raw)} bytes, over the {MAX_COMMITMENT_BYTES}-byte cap")
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as e:
            raise CommitmentRejected(f"commitment is not valid UTF-8 (byte {e.start})") from None
    elif isinstance(raw, str):
        if len(raw) > MAX_COMMITMENT_BYTES:  # a str never has fewer bytes than characters
            raise CommitmentRejected(f"commitment is {len(raw)} characters, over the {MAX_COMMITMENT_BYTES}-byte cap")
        try:
            size = len(raw.encode("utf-8"))
        except UnicodeEncodeError:
            raise CommitmentRejected("commitment holds characters that are not valid UTF-8 (lone surrogates)") from None
        if size > MAX_COMMITMENT_BYTES:
            raise CommitmentRejected(f"commitment is {size} bytes, over the {MAX_COMMITMENT_BYTES}-byte cap")
        text = raw
    else:
        raise CommitmentRejected(f"commitment must be str or bytes, got {type(raw).__name__}")
    for i, ch in enumerate(text):
        # The grammar is printable ASCII without spaces; anything else is refused by position,
        # so a log line never carries a control character or a look-alike letter.
        if not ("!" <= ch <= "~"):
            raise CommitmentRejected(f"commitment has a disallowed character {ch!r} at position {i}")
    return text


def parse_commitment(raw: str | bytes, *, localnet: bool = False) -> Commitment:
    """Parse a commitment read from chain; raises CommitmentRejected with the reason."""
    text = _as_text(raw)
    if not text:
        raise CommitmentRejected("commitment is empty")
    fields = text.split(SEPARATOR)
    if fields[0] in RETIRED_VERSIONS:
        raise CommitmentRejected(f"commitment version {fields[0]!r} is retired ({RETIRED_VERSIONS[fields[0]]}); "
                                 f"re-commit as {VERSION!r} with this toolkit")
    if fields[0] != VERSION:
        raise CommitmentRejected(f"unknown commitment version {_show(fields[0])} (supported: {VERSION!r})")
    if len(fields) < 2 or fields[1] not in KINDS:
        kind = fields[1] if len(fields) > 1 else ""
        raise CommitmentRejected(f"unknown storage kind {_show(kind)} (known: {', '.join(KINDS)})")
    kind = fields[1]
    expected = 6 if kind == "http" else 5  # http's location is host ':' port
    if len(fields) != expected:
        what = "extra fields" if len(fields) > expected else "missing fields"
        raise CommitmentRejected(f"{kind} commitment has {what}: {len(fields)} ':'-separated fields, expected {expected}")
    if kind == "http":
        location, revision, bound = f"{fields[2]}{SEPARATOR}{fields[3]}", fields[4], fields[5]
        _check_host_port(location, localnet)
    else:
        location, revision, bound = fields[2], fields[3], fields[4]
        if kind == "hf":
            _check_hf_repo_id(location)
        else:
            if not localnet:
                raise CommitmentRejected("storage kind 'local' is allowed on localnet only")
            _check_local_path(location)
    _check_revision(kind, revision)
    _check_binding(bound)
    return Commitment(kind, location, revision, bound)


def encode_commitment(commitment: Commitment) -> str:
    """The commitment string for `commitment`; raises CommitmentRejected if it breaks the grammar.

    Encoding re-parses its own output (grammar only, localnet allowed), so anything this returns
    parses back to the same Commitment.
    """
    parts = (commitment.kind, commitment.location, commitment.revision, commitment.binding)
    if not all(isinstance(p, str) for p in parts):
        raise CommitmentRejected("commitment fields must be strings")
    if commitment.kind not in KINDS:
        raise CommitmentRejected(f"unknown storage kind {_show(commitment.kind)} (known: {', '.join(KINDS)})")
    if commitment.kind != "http" and SEPARATOR in commitment.location:
        raise CommitmentRejected(f"{commitment.kind} location {_show(commitment.location)} may not contain ':'")
    if commitment.kind == "http" and commitment.location.count(SEPARATOR) != 1:
        raise CommitmentRejected(f"http location {_show(commitment.location)} must be host:port")
    text = SEPARATOR.join((VERSION, *parts))
    if parse_commitment(text, localnet=True) != commitment:
        raise CommitmentRejected(f"commitment {_show(text)} does not parse back to itself")
    return text
