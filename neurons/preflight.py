"""Preflight: what `quasar miner` and `quasar validator` check before any training or evaluation.

A broken setup used to show only at the miner's first commit, hours in. Each check here takes
seconds and, when it fails, says what to change. In order:

    competition  the file the role would run matches the network: its netuid is --netuid, the
                 shipped `localnet` competition only on the local chain, and off the local chain
                 every field two validators must agree on is pinned (`Competition.unpinned()`)
    device       --device is one this machine has (quasar_model.devices: auto is cuda when there
                 is one, else cpu)
    storage      (miner) http: a public host validators can dial (no loopback, private, link-local
                 or unspecified address, no local name) and a fixed port, outside the local chain;
                 hf: a repo id and $HF_TOKEN; local: only on the local chain
    work dir     exists or can be created, and a file can be written in it
    disk         free space on the work dir's filesystem >= the threshold (`required_free_bytes`)
    chain        the keys open (an existing wallet off the local chain; on the local chain its
                 SQLite file must already exist, `quasar localnet` creates it), and the chain
                 answers its block number within `timeout` seconds
    registered   the hotkey has a uid on --netuid
    permit       (validator) the hotkey holds a validator permit
    status port  (validator) a fixed --status-port can be bound

`quasar doctor miner|validator FLAGS` runs the same checks alone and prints each result; the roles
stop at the first failure with one `error:` line (exit status 2).
"""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from distill.config import load_config
from eval.competition import load_competition
from neurons import network
from neurons.addresses import address_problem
from neurons.commitment import CommitmentRejected, _check_host, _check_hf_repo_id
from neurons.network import BITTENSOR_LOCAL, OLD_LOCAL_HINT
from quasar_model.devices import AUTO, resolve_device

GIB = 1 << 30
LOCAL = "localnet"  # neurons.network.LOCALNET: the SQLite local chain
# the competition a network runs when --competition is not given; any other network names its own
DEFAULT_COMPETITION = {LOCAL: "localnet", "finney": "sn24"}
# free disk below which a role refuses to start. A validator: this many of the largest checkpoint the
# competition admits (bf16, 2 bytes a parameter): a stored submission, one being fetched and the
# teacher's cache. A miner, per parameter of its own student (the competition's cap when its config
# cannot say): its export and the copy being published (save_pretrained writes float32, 4 bytes),
# and the training checkpoints it keeps plus the one being written (float32 weights and AdamW's
# two moments, 12 bytes); scripts/disk_figures.py measures these rates
CHECKPOINTS_OF_HEADROOM = 3
EXPORT_BYTES_PER_PARAM, TRAINING_BYTES_PER_PARAM = 4, 12
MIN_FREE_BYTES = 1 * GIB


class PreflightError(ValueError):
    """A preflight check failed; the message names the problem and the fix."""


@dataclass(frozen=True)
class Result:
    name: str
    ok: bool
    detail: str  # what was found; for a failure, the problem and the fix
    skipped: bool = False  # not run: a check it needs failed

    def line(self) -> str:
        return f"{'skip' if self.skipped else 'ok  ' if self.ok else 'FAIL'}  {self.name:<12} {self.detail}"


def competition_name(args) -> str:
    """--competition, or the network's own competition; refuses to guess for any other network."""
    if getattr(args, "competition", None):
        return args.competition
    name = DEFAULT_COMPETITION.get(args.network)
    if name is None:
        raise PreflightError(f"network {args.network!r} has no default competition: name it with --competition "
                             f"(a shipped name such as 'sn24', or the subnet's competition file)" + _old_local_hint(args))
    return name


def _old_local_hint(args) -> str:
    """`local` meant the SQLite chain before it was renamed `localnet`: say so when it fails."""
    return f" ({OLD_LOCAL_HINT})" if args.network == BITTENSOR_LOCAL else ""


def required_free_bytes(competition) -> int:
    return max(MIN_FREE_BYTES, CHECKPOINTS_OF_HEADROOM * 2 * competition.student.max_total_params)


def miner_free_bytes(params: int, keep_checkpoints: int) -> int:
    per_param = 2 * EXPORT_BYTES_PER_PARAM + (keep_checkpoints + 1) * TRAINING_BYTES_PER_PARAM
    return max(MIN_FREE_BYTES, per_param * params)


def miner_student(args, competition) -> tuple[int, int, str]:
    """(parameters, training checkpoints kept, where the count came from) for the miner's distill
    config; the competition's cap when the config cannot be read here (the miner says why later)."""
    try:
        from quasar_model import QuasarLongConfig  # here: these load torch, which a refusal need not wait for
        from quasar_model.report import parameter_counts

        cfg = load_config(getattr(args, "config", None), getattr(args, "override", None) or [], check=False)
        if cfg.student.init_from:
            config = QuasarLongConfig.from_pretrained(cfg.student.init_from)
        else:
            config = QuasarLongConfig.preset(cfg.student.preset, vocab_size=competition.student.vocab_size,
                                             **cfg.student.overrides)
        return parameter_counts(config)["total"], cfg.keep_checkpoints, f"its {cfg.student.preset!r} student"
    except Exception:  # noqa: BLE001 - a bad config is reported by the miner itself, with its own message
        return competition.student.max_total_params, 2, "the competition's parameter cap"


def _timed(fn: Callable, seconds: float, what: str):
    """fn() in a daemon thread; PreflightError when it takes longer than `seconds` (a blackholed
    endpoint must not hang the preflight)."""
    out: dict = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001  re-raised in the caller's thread
            out["error"] = e

    t = threading.Thread(target=target, daemon=True, name=f"preflight {what}")
    t.start()
    t.join(seconds)
    if t.is_alive():
        raise PreflightError(f"{what}: no answer within {seconds:g} s")
    if "error" in out:
        raise out["error"]
    return out["value"]


class Preflight:
    """The checks for one role (`miner` or `validator`) from its parsed command-line flags.

    `open_chain(args)` gives (chain, hotkey keypair) (neurons.network.open_chain; tests hand in a
    chain over a substrate stand-in). After `run()`, `chain`, `keypair` and `competition` hold what
    the checks opened, for the role to use."""

    def __init__(self, args, role: str, open_chain: Callable | None = None, timeout: float = 30.0):
        if role not in ("miner", "validator"):
            raise ValueError(f"unknown role {role!r}")
        self.args, self.role, self.timeout = args, role, timeout
        self._open_chain = open_chain or network.open_chain
        self.local = args.network == LOCAL
        self.chain = self.keypair = self.competition = self.device = None

    # each check returns a detail string or raises PreflightError with the fix
    def checks(self) -> list[tuple[str, Callable[[], str]]]:
        out = [("competition", self.check_competition), ("device", self.check_device)]
        if self.role == "miner":
            out.append(("storage", self.check_storage))
            out.append(("metrics port", self.check_metrics_port))
        out += [("work dir", self.check_work_dir), ("disk", self.check_disk), ("chain", self.check_chain),
                ("registered", self.check_registered)]
        if self.role == "validator":
            out.append(("permit", self.check_permit))
            out.append(("status port", self.check_status_port))
        return out

    def run(self, stop_at_failure: bool = True, report: Callable[[Result], None] | None = None) -> list[Result]:
        """Every check in order; with `stop_at_failure`, PreflightError at the first failure. A check
        that needs an earlier one (the chain for registration, the competition for disk) is
        skipped when that one failed."""
        results: list[Result] = []
        for name, check in self.checks():
            if self._skip(name, results):
                result = Result(name, False, "not checked: it needs the checks that failed above", skipped=True)
            else:
                try:
                    result = Result(name, True, check())
                except (PreflightError, OSError) as e:
                    result = Result(name, False, str(e))
                except ValueError as e:  # a competition file, a key name, a chain path: their own words
                    result = Result(name, False, str(e))
                except Exception as e:  # noqa: BLE001  e.g. the chain's ChainError: one line, not a traceback
                    result = Result(name, False, f"{type(e).__name__}: {e}")
            results.append(result)
            if report is not None:
                report(result)
            if stop_at_failure and not result.ok:
                raise PreflightError(f"preflight {name}: {result.detail}")
        return results

    @staticmethod
    def _skip(name: str, results: list[Result]) -> bool:
        failed = {r.name for r in results if not r.ok}
        needs = {"disk": {"competition"}, "registered": {"chain"}, "permit": {"chain"}}
        return bool(needs.get(name, set()) & failed)

    # ---------------------------------------------------------------- the checks
    def check_competition(self) -> str:
        a = self.args
        name = competition_name(a)
        c = load_competition(name)
        if c.netuid != a.netuid:
            raise PreflightError(f"competition {c.name!r} is for netuid {c.netuid}, not --netuid {a.netuid}: "
                                 f"pass the competition of netuid {a.netuid} or --netuid {c.netuid}")
        if not self.local:
            if c.name == "localnet":
                raise PreflightError(f"competition 'localnet' is the local chain's, not {a.network}'s: pass "
                                     f"--competition sn24 (or the subnet's competition file)")
            unpinned = c.unpinned()
            if unpinned:
                raise PreflightError(f"competition {c.name!r} is not pinned for a real network: " + "; ".join(unpinned)
                                     + " (the subnet owner pins them: use the subnet's released competition file)")
        self.competition = c
        return f"{c.name} (netuid {c.netuid}, digest {c.digest[:12]})"

    def check_storage(self) -> str:
        a = self.args
        if a.storage == "local":
            if not self.local:
                raise PreflightError(f"--storage local is for the local chain only; on {a.network} use --storage hf "
                                     "--hf.repo OWNER/NAME (or --storage http --public-host HOST --port PORT)")
            if not a.storage_root:
                raise PreflightError("--storage local needs --storage-root DIR")
            return f"local at {a.storage_root}"
        if a.storage == "hf":
            if not a.hf_repo:
                raise PreflightError("--storage hf needs --hf.repo OWNER/NAME (a Hub model repo you can write to)")
            try:  # the commitment grammar's rule: a repo id that could not be committed
                _check_hf_repo_id(a.hf_repo)
            except CommitmentRejected as e:
                raise PreflightError(f"--hf.repo: {e}") from None
            if not os.environ.get("HF_TOKEN"):
                raise PreflightError("--storage hf needs HF_TOKEN in the environment (a token with write access to "
                                     f"{a.hf_repo})")
            return f"hf repo {a.hf_repo}"
        host = a.public_host or a.host
        if self.local:
            return f"http on {a.host}:{a.port or 'any free port'} (local chain: loopback allowed)"
        problem = host_problem(host)
        if problem:
            fix = ("pass --public-host with this machine's public IP or DNS name" if not a.public_host
                   else "pass a --public-host that validators can reach from the internet")
            raise PreflightError(f"http storage: validators would be told to dial {host}: {problem}; {fix}")
        if not a.port:
            raise PreflightError("http storage: --port 0 picks a random port each start, and the committed one "
                                 "goes stale at the next restart; pass a fixed --port (and open it)")
        if not 1 <= a.port <= 65535:
            raise PreflightError(f"http storage: --port {a.port} is not in 1..65535")
        return f"http, validators dial {host}:{a.port}"

    def check_device(self) -> str:
        """--device names a device this machine has; `device` holds what it resolved to."""
        asked = getattr(self.args, "device", AUTO)
        self.device = resolve_device(asked)
        return self.device if asked == self.device else f"{self.device} (--device {asked})"

    def check_work_dir(self) -> str:
        """Writable, or creatable: nothing is created here (a failed preflight leaves nothing behind)."""
        d = Path(self.args.work_dir).absolute()
        existing = next(p for p in (d, *d.parents) if p.exists())
        if not existing.is_dir():
            raise PreflightError(f"work dir {d}: {existing} is not a directory; pass another --out")
        if existing == d:
            try:
                with tempfile.NamedTemporaryFile(dir=d, prefix=".preflight-"):
                    pass
            except OSError as e:
                raise PreflightError(f"work dir {d} is not writable ({e.strerror or e}): pass an --out you "
                                     "can write to") from None
            return str(d)
        if not os.access(existing, os.W_OK | os.X_OK):
            raise PreflightError(f"work dir {d} cannot be created: {existing} is not writable; pass an --out "
                                 "you can write to")
        return f"{d} (created at start)"

    def check_disk(self) -> str:
        d = Path(self.args.work_dir).absolute()
        free = shutil.disk_usage(next(p for p in (d, *d.parents) if p.exists())).free
        gb = getattr(self.args, "min_free_gb", None)
        if gb is not None:
            need, why = int(gb * GIB), "--min-free-gb"
        elif self.role == "miner":
            params, keep, source = miner_student(self.args, self.competition)
            need = miner_free_bytes(params, keep)
            why = f"{params / 1e9:.2f} B parameters ({source}): its export, a copy, {keep + 1} training checkpoints"
        else:
            need, why = required_free_bytes(self.competition), f"{CHECKPOINTS_OF_HEADROOM} of the competition's largest checkpoints"
        if free < need:
            raise PreflightError(f"{free / GIB:.1f} GiB free under {d}, {need / GIB:.1f} GiB needed ({why}): free "
                                 "space, pick another --out, or lower --min-free-gb")
        return f"{free / GIB:.1f} GiB free, {need / GIB:.1f} GiB needed ({why})"

    def check_chain(self) -> str:
        a = self.args
        if self.local and not Path(a.chain_path).exists():
            raise PreflightError(f"no local chain at {a.chain_path}: `quasar localnet` creates one (or pass "
                                 "--chain.path); for a bittensor network pass --network finney|test|local|ws://...")
        try:
            self.chain, self.keypair = self._open_chain(a)
        except FileNotFoundError as e:
            raise PreflightError(f"{e}") from None
        try:
            block = _timed(self.chain.block, self.timeout, f"chain {a.network}")
        except PreflightError as e:
            raise PreflightError(f"{e}; check the endpoint (--network) and this machine's connection"
                                 + _old_local_hint(a)) from None
        except Exception as e:  # noqa: BLE001  ChainRpcError and the like
            raise PreflightError(f"{a.network} is unreachable ({e}); check the endpoint (--network) and this "
                                 "machine's connection" + _old_local_hint(a)) from None
        return f"{a.network} at block {block}"

    def _metagraph(self):
        if not hasattr(self, "_mg"):
            self._mg = _timed(self.chain.metagraph, self.timeout, f"metagraph of netuid {self.args.netuid}")
        return self._mg

    def check_registered(self) -> str:
        a, hotkey = self.args, self.keypair.ss58_address
        uid = self._metagraph().uid_of(hotkey)
        if uid is None:
            how = ("`quasar localnet` registers its keys" if self.local
                   else f"register it: btcli subnets register --netuid {a.netuid} --wallet.name {a.wallet_name} "
                        f"--wallet.hotkey {a.wallet_hotkey}")
            raise PreflightError(f"hotkey {hotkey} is not registered on netuid {a.netuid}: {how}")
        return f"hotkey {hotkey} is uid {uid}"

    def check_permit(self) -> str:
        mg, hotkey = self._metagraph(), self.keypair.ss58_address
        i = mg.hotkeys.index(hotkey)
        if not mg.validator_permit[i]:
            raise PreflightError(f"hotkey {hotkey} (uid {mg.uids[i]}) has no validator permit on netuid "
                                 f"{self.args.netuid} (stake {mg.stakes[i]:g}): stake to it (btcli stake add) and "
                                 "wait for the next epoch")
        return f"validator permit (stake {mg.stakes[i]:g})"


    def check_status_port(self) -> str:
        a = self.args
        return _port_free("--status-port", a.status_host, a.status_port, "status server")

    def check_metrics_port(self) -> str:
        a = self.args
        return _port_free("--metrics-port", a.metrics_host, a.metrics_port, "metrics server")


def _port_free(flag: str, host: str, port: int, what: str) -> str:
    """The server behind `flag` can bind `host`:`port` (-1: no server; 0: any free port)."""
    if port < 0:
        return f"disabled ({flag} -1)"
    if port == 0:
        return f"a free port on {host}, picked at start"
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
            s.bind((host, port))
    except OSError as e:
        raise PreflightError(f"{flag} {port} on {host} cannot be bound ({e.strerror or e}): another process "
                             f"uses it; pick another port, 0 for a free one, or -1 for no {what}") from None
    return f"{host}:{port} is free"


def host_problem(host: str) -> str | None:
    """Why validators could not dial `host` on a real network, or None: the commitment grammar's
    host rules (neurons.commitment), then every address the name resolves to must be public
    (neurons.addresses), as the validator's fetcher checks it."""
    if host in ("", "0.0.0.0", "::"):
        return f"{host or 'an empty host'} is the unspecified address (bind-all), not one validators can dial"
    try:
        _check_host(host, localnet=False)
    except CommitmentRejected as e:
        return str(e)
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as e:
        return f"{host} cannot be resolved ({e.strerror or e})"
    for info in infos:
        problem = address_problem(info[4][0])
        if problem:
            return f"{host} resolves to a refused address: {problem}"
    return None
