"""`quasar`: one command, a subcommand per job. Each subcommand's code lives in its own package."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from distill.cli import add_commands as add_distill_commands
from eval.cli import add_commands as add_eval_commands
from eval.competition import load_competition
import neurons.validator  # Validator through the module, as network.open_chain*: tests stand fakes in there
from neurons import logs
from neurons.chain import ChainError
from neurons.cliparse import Deprecated, QuasarParser, warn_deprecated
from neurons.miner import Miner, MinerSettings
from neurons import network
from neurons.network import LOCALNET, add_chain_args
from neurons.preflight import Preflight, competition_name
from neurons.replay import replay_command
from neurons.standing import render, standing
from neurons.status import StatusServer
from neurons.validator import ValidatorSettings
from quasar_model.devices import AUTO
from quasar_model.devices import HELP as DEVICE_HELP
from quasar_model.teacher_outputs import TeacherCacheError


def cmd_params(args) -> int:
    from quasar_model import PRESETS, QuasarLongConfig  # here, as in demo: the model loads torch (seconds)
    from quasar_model.report import branch_layout, parameter_counts

    names = args.preset or list(PRESETS)
    unknown = [n for n in names if n not in PRESETS]
    if unknown:  # before the table's header: nothing printed for a bad request
        raise ValueError(f"unknown preset {unknown[0]!r}; known: {sorted(PRESETS)}")
    print(f"{'preset':<8} {'total':>14} {'active':>14}  hybrid layers")
    for name in names:
        cfg = QuasarLongConfig.preset(name)
        c = parameter_counts(cfg)
        layout = " ".join(f"{i}:{k[0]}" for i, k in branch_layout(cfg).items()) or "-"
        print(f"{name:<8} {c['total']:>14,} {c['active']:>14,}  {layout}")
    return 0


def cmd_demo(args) -> int:
    """Build a model from a preset, check cached decoding against the full forward, and generate."""
    if args.prompt_len < 1 or args.new_tokens < 1:
        raise ValueError(f"--prompt-len and --new-tokens must be >= 1, got {args.prompt_len} and {args.new_tokens}")
    import torch

    from quasar_model import QuasarLongConfig, QuasarLongForCausalLM

    torch.manual_seed(args.seed)
    cfg = QuasarLongConfig.preset(args.preset)
    model = QuasarLongForCausalLM(cfg).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len))
    with torch.no_grad():
        t0 = time.perf_counter()
        cached = model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False, use_cache=True)
        t1 = time.perf_counter()
        uncached = model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False, use_cache=False)
        t2 = time.perf_counter()
    same = torch.equal(cached, uncached)
    print(f"preset {args.preset}: generated {args.new_tokens} tokens after a {args.prompt_len}-token prompt")
    print(f"  with cache    {args.new_tokens / (t1 - t0):8.1f} tok/s   {cached[0, args.prompt_len:].tolist()}")
    print(f"  without cache {args.new_tokens / (t2 - t1):8.1f} tok/s   identical: {same}")
    return 0 if same else 1


def preflight(args, role: str):
    """Preflight checks (neurons.preflight) before any training or evaluation: PreflightError, one
    `error:` line, at the first failure; else the checks' chain, keypair and competition."""
    pf = Preflight(args, role, open_chain=network.open_chain)
    pf.run(stop_at_failure=True)
    return pf


def cmd_doctor(args) -> int:
    """The miner's or validator's preflight checks alone, each result printed; 2 when one failed."""
    results = Preflight(args, args.role).run(stop_at_failure=False, report=lambda r: print(r.line(), flush=True))
    failed = [r.name for r in results if not r.ok and not r.skipped]
    if failed:
        print(f"quasar doctor: error: {len(failed)} check(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 2
    return 0


def cmd_miner(args) -> int:

    logs.setup(f"miner:{args.wallet_name}", args.log_level)
    pf = preflight(args, "miner")
    settings = MinerSettings(
        work_dir=Path(args.work_dir), distill_config=args.config, overrides=args.override,
        steps_per_cycle=args.steps_per_cycle, eval_seed=args.eval_seed, min_improvement=args.min_improvement,
        min_commit_interval_blocks=args.min_commit_interval, seal_blocks=args.seal_blocks, storage=args.storage, host=args.host, port=args.port,
        public_host=args.public_host, storage_root=args.storage_root and Path(args.storage_root),
        repo_id=args.hf_repo, hf_token=os.environ.get("HF_TOKEN"), device=pf.device,
        copy_from=args.copy_from and Path(args.copy_from), adversary=args.adversary,
        serve_after_training=not args.exit_after_training,
        progress=not args.quiet, metrics_host=args.metrics_host,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port)
    miner = Miner(pf.chain, pf.keypair, pf.competition, settings)
    miner.install_signal_handlers()
    miner.run()
    return 0


def cmd_validator(args) -> int:

    log = logs.setup("validator", args.log_level)
    pf = preflight(args, "validator")
    settings = ValidatorSettings(
        work_dir=Path(args.work_dir), device=pf.device, localnet=args.network == LOCALNET,
        storage_root=args.storage_root and Path(args.storage_root), poll_seconds=args.poll_seconds,
        fetch_concurrency=args.fetch_concurrency, fetch_deadline=args.fetch_deadline,
        disk_budget_bytes=int(args.disk_budget_gb * (1 << 30)), progress=not args.quiet,
        eval_timeout=args.eval_timeout, eval_time_scale=args.eval_time_scale, max_eval_attempts=args.max_eval_attempts,
        eval_memory_bytes=None if args.eval_memory_gb is None else int(args.eval_memory_gb * (1 << 30)),
        allow_stack_mismatch=args.allow_stack_mismatch)
    validator = neurons.validator.Validator(pf.chain, pf.keypair, pf.competition, settings)
    validator.install_signal_handlers()
    status = None
    if args.status_port >= 0:
        status = StatusServer(validator.state.path, host=args.status_host, port=args.status_port,
                              metrics=validator.metrics).start()
        logs.event(log, "status", url=status.url)
        (Path(args.work_dir) / "status.url").write_text(status.url)
    try:
        validator.run(max_rounds=args.max_rounds)
    finally:
        if status is not None:
            status.stop()
    return 0


def cmd_status(args) -> int:
    """A hotkey's latest commitment, its eligibility and the weights validators set on it (neurons.standing)."""

    from bittensor.sp_core import ss58_decode  # here: bittensor costs ~0.8 s, and only `status` needs it

    try:
        ss58_decode(args.hotkey)
    except ValueError as e:
        raise ValueError(f"--hotkey {args.hotkey!r} is not an ss58 address ({e})") from None
    competition = load_competition(competition_name(args))
    chain = network.open_chain_to_read(args)
    s = standing(chain, competition.schedule, args.hotkey, localnet=args.network == LOCALNET)
    print(json.dumps(s.to_dict()) if args.json else "\n".join(render(s, args.network)))
    return 0


def cmd_localnet(args) -> int:
    from neurons.localnet import run_localnet  # here: it loads bittensor's keys (~0.9 s)

    return run_localnet(Path(args.out), rounds=args.rounds, block_time=args.block_time, timeout=args.timeout,
                        fresh=not args.keep)


def add_miner_args(p: argparse.ArgumentParser) -> None:
    """`quasar miner`'s flags (also `quasar doctor miner`'s)."""
    add_chain_args(p)
    p.add_argument("--competition", default=None,
                   help="shipped competition name or a file (default: the network's own: localnet on localnet, sn24 on finney)")
    p.add_argument("--config", default=None, help="distill config file (see configs/)")
    p.add_argument("--set", dest="override", action="append", default=[], metavar="KEY=VALUE",
                   help="a distill config value, e.g. --set steps=2000 (repeatable)")
    p.add_argument("--override", dest="override", action=Deprecated, append=True, use="--set")
    add_out_arg(p, "miner", "the miner's directory: state (miner.json), training checkpoints, exports")
    p.add_argument("--steps-per-cycle", type=int, default=200, help="training steps between self-evaluations")
    p.add_argument("--eval-seed", type=int, default=1, help="seed of the self-evaluation's items (fixed: "
                   "successive checkpoints are compared on the same items)")
    p.add_argument("--min-improvement", type=float, default=0.0, help="composite gain needed to publish again")
    p.add_argument("--min-commit-interval", type=int, default=0, help="blocks between two commitments")
    p.add_argument("--seal-blocks", type=_blocks, default=None,
                   help="keep each commitment timelocked (unreadable) this many blocks; 0: plain commitments "
                        "(default: half the competition's eval_delay_blocks)")
    p.add_argument("--storage", choices=["http", "local", "hf"], default="http",
                   help="where checkpoints are published: this machine's signed HTTP server, a Hub repo, or a "
                        "local directory (localnet only)")
    p.add_argument("--host", default="127.0.0.1", help="bind address of the checkpoint server")
    p.add_argument("--port", type=int, default=0, help="checkpoint server port (0: any free port; localnet only)")
    p.add_argument("--public-host", default=None, help="host validators dial (default: --host)")
    p.add_argument("--storage-root", default=None, help="local storage root (localnet)")
    p.add_argument("--hf.repo", dest="hf_repo", default=None, help="Hub repo for hf storage (token: $HF_TOKEN)")
    p.add_argument("--device", default=AUTO, help=f"torch device of the self-evaluation: {DEVICE_HELP}")
    p.add_argument("--copy-from", default=None, help=argparse.SUPPRESS)  # localnet's adversaries: the victim
    p.add_argument("--adversary", default=None, help=argparse.SUPPRESS,  # localnet: neurons.adversaries kind
                   choices=["copy", "near-copy", "crash", "teacher"])
    p.add_argument("--exit-after-training", action="store_true",
                   help="exit when the config's steps are done instead of serving the last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--min-free-gb", type=float, default=None,
                   help="free disk the preflight requires under --out (default: 3 of the competition's "
                        "largest bf16 checkpoints, at least 1 GiB)")
    p.add_argument("--metrics-host", default="127.0.0.1", help="bind address of the Prometheus /metrics server")
    p.add_argument("--metrics-port", type=int, default=-1,
                   help="serve Prometheus /metrics (steps, loss, last commit block) on this port; 0: a free one; "
                        "-1 (default): no metrics server")


def add_validator_args(p: argparse.ArgumentParser) -> None:
    """`quasar validator`'s flags (also `quasar doctor validator`'s)."""
    add_chain_args(p)
    p.add_argument("--competition", default=None,
                   help="shipped competition name or a file (default: the network's own: localnet on localnet, sn24 on finney)")
    add_out_arg(p, "validator", "the validator's directory: validator.db, fetched submissions, round inputs")
    p.add_argument("--device", default=AUTO, help=f"torch device of the evaluations: {DEVICE_HELP}")
    p.add_argument("--storage-root", default=None, help="local storage root (localnet)")
    p.add_argument("--status-host", default="127.0.0.1", help="bind address of the status server")
    p.add_argument("--status-port", type=int, default=0, help="status server port (0: any free port; -1: none)")
    p.add_argument("--poll-seconds", type=float, default=2.0, help="seconds between chain polls while waiting")
    p.add_argument("--fetch-concurrency", type=int, default=4, help="fetches running at once")
    p.add_argument("--fetch-deadline", type=float, default=3600.0, help="seconds for all of a round's fetches")
    p.add_argument("--disk-budget-gb", type=float, default=500.0,
                   help="stored checkpoints no round needs are evicted beyond this")
    p.add_argument("--max-rounds", type=int, default=None, help="exit after this many scored rounds")
    p.add_argument("--eval-timeout", type=float, default=None,
                   help="seconds one submission's evaluation may take before it is rejected (default: the "
                        "competition's budget.seconds times --eval-time-scale)")
    p.add_argument("--eval-time-scale", type=float, default=1.0,
                   help="how much slower this machine evaluates than the competition's budget.reference_gpu "
                        "(the timeout is budget.seconds times this; default 1)")
    p.add_argument("--max-eval-attempts", type=int, default=2,
                   help="evaluations of one model that may end with the validator killed before it is rejected")
    p.add_argument("--eval-memory-gb", type=float, default=None,
                   help="memory cap of one CPU evaluation (default: 80%% of physical memory)")
    p.add_argument("--allow-stack-mismatch", action="store_true",
                   help="score although installed library versions differ from the competition's eval_stack "
                        "(recorded with every round)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--min-free-gb", type=float, default=None,
                   help="free disk the preflight requires under --out (default: 3 of the competition's "
                        "largest bf16 checkpoints, at least 1 GiB)")


def add_out_arg(p: argparse.ArgumentParser, default: str, what: str, old: str = "--work-dir") -> None:
    """`--out DIR`, the one spelling of a command's output directory; `old` is kept, deprecated."""
    p.add_argument("--out", dest="work_dir", default=default, metavar="DIR", help=what)
    p.add_argument(old, dest="work_dir", action=Deprecated, use="--out")


def _blocks(text: str) -> int:
    """A block count: an int >= 0 (argparse turns the error into one `error:` line, rc 2)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of blocks") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{n} blocks: give 0 (off) or more")
    return n


def build_parser() -> argparse.ArgumentParser:
    parser = QuasarParser(prog="quasar", description="SN24 Quasar miner/validator toolkit")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("params", help="total and active parameter counts of the presets (meta device)")
    p.add_argument("--preset", action="append", help="preset name (repeatable; default: all)")
    p.set_defaults(func=cmd_params)
    p = sub.add_parser("demo", help="build a preset, check cached decoding, generate a few tokens")
    p.add_argument("--preset", default="tiny", help="model preset (see `quasar params`)")
    p.add_argument("--prompt-len", type=int, default=48, help="tokens of the random prompt")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens to generate")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the prompt")
    p.set_defaults(func=cmd_demo)
    add_distill_commands(sub)
    add_eval_commands(sub, replay=replay_command)

    p = sub.add_parser("miner", help="distil, self-evaluate, publish and commit improvements, serve them")
    add_miner_args(p)
    p.set_defaults(func=cmd_miner)

    p = sub.add_parser("validator", help="score submissions every cadence and set weights")
    add_validator_args(p)
    p.set_defaults(func=cmd_validator)

    p = sub.add_parser("doctor", help="run the miner's or validator's preflight checks alone and print each result")
    roles = p.add_subparsers(dest="role", required=True)
    add_miner_args(roles.add_parser("miner", help="the miner's checks (takes the miner's flags)"))
    add_validator_args(roles.add_parser("validator", help="the validator's checks (takes the validator's flags)"))
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("status", help="a hotkey's latest commitment, eligibility block, and the weights, rank and "
                                      "incentive validators give it (reads the chain only)")
    add_chain_args(p)
    p.add_argument("--hotkey", required=True, metavar="SS58", help="the hotkey to look up")
    p.add_argument("--competition", default=None,
                   help="shipped competition name or a file, for its cadence and eval delay (default: the network's own)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("localnet", help="a whole subnet on this machine: chain, teacher, miners, validator")
    p.add_argument("--out", default="localnet", metavar="DIR",
                   help="run directory (chain, keys, logs, report); refused when it holds files localnet did "
                        "not create")
    p.add_argument("--dir", dest="out", action=Deprecated, use="--out")
    p.add_argument("--rounds", type=int, default=2, help="scored rounds before the report")
    p.add_argument("--block-time", type=float, default=1.0, help="seconds per block of the local chain")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds the whole run may take")
    p.add_argument("--keep", action="store_true", help="continue the chain and state in --out instead of starting "
                                                       "afresh")
    p.set_defaults(func=cmd_localnet)

    _add_logging_args(parser)
    return parser


def _add_logging_args(parser: argparse.ArgumentParser) -> None:
    """`--log-level` / `--logging.*` on every (sub)command, so they go anywhere on the line."""
    subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subcommands:
        logs.add_args(parser)
    for action in subcommands:
        for sub in action.choices.values():
            _add_logging_args(sub)


def _version() -> str:
    try:
        return version("quasar-sn24")
    except PackageNotFoundError:  # a checkout run without `pip install -e .`
        return "unknown (not installed)"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    logs.setup(args.command, args.log_level)  # miner and validator set it again, naming their role
    warn_deprecated(args, logging.getLogger(args.command))

    try:
        return args.func(args)
    except Exception as e:
        # bad configs, files, checkpoints and arguments, and chain refusals: the message names the
        # problem; a traceback adds nothing for an operator (QUASAR_DEBUG=1 keeps it)
        if not isinstance(e, (ValueError, ChainError, TeacherCacheError)):
            raise
        if os.environ.get("QUASAR_DEBUG"):
            raise
        print(f"quasar {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
