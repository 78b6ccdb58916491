"""`quasar teacher-cache`, `quasar init-student` and `quasar distill`.

    quasar teacher-cache --teacher Qwen/Qwen3-8B --data HuggingFaceFW/fineweb-edu --max-docs 100000 \\
        --k 64 --seq-len 2048 --out caches/train
    quasar distill configs/distill_tiny.json --set optim.lr=1e-3 --set steps=500
    torchrun --nproc_per_node 8 -m distill.cli distill my.yaml --set parallel=fsdp

(`--max-docs N` reads a source's first N documents: a fine training set, since validators draw
their held-out documents by the round seed from every file of the dataset, not from its start.)

Structural distillation (the Quasar-10B recipe): a student that starts as the teacher, trained
with layer-wise hidden-state MSE against the live teacher (configs/structural_tiny.json):

    quasar init-student --teacher Qwen/Qwen3-0.6B --replace --hybrid-layers 4-27 --out runs/q06/student
    quasar distill my.json --set student.init_from=runs/q06/student --set teacher.model=Qwen/Qwen3-0.6B \\
        --set loss.hidden_mse_weight=1

`--teacher tiny-teacher` is the project's own ~1M-parameter teacher (trained on first use) and
`--data corpus:train` / `corpus:heldout` the local real-text corpus: the offline end-to-end run.
Also runnable as `python -m distill.cli ...`.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import signal
import sys
from dataclasses import asdict
from pathlib import Path

from quasar_model import corpus
from quasar_model.devices import HELP as DEVICE_HELP
from quasar_model.devices import resolve_device
from quasar_model.teacher_outputs import TeacherCacheError
from quasar_model.teacher_outputs.tiny_teacher import TINY_TEACHER, resolve_teacher

from .config import json_or_text, load_config

# The imports left inside the commands (transformers, distill.data / sequence_kd / structural /
# trainer, quasar_model.teacher_outputs.capture / cache) load torch, seconds: `quasar --help` and
# a bad flag must not wait for them.

CORPUS_PREFIX = "corpus:"


def read_documents(data: str, *, split: str, text_field: str, max_docs: int | None) -> list[str]:
    """The texts of a data source (`corpus:<split>` = the local corpus, else via distill.data.load_texts)."""
    from .data import load_texts

    if data.startswith(CORPUS_PREFIX):
        docs = corpus.local_split(data[len(CORPUS_PREFIX):])
    else:
        docs = []
        for text in load_texts(data, split=split, text_field=text_field):
            if max_docs is not None and len(docs) >= max_docs:
                break
            docs.append(text)
    if max_docs is not None:
        docs = docs[:max_docs]
    if not docs:
        raise ValueError(f"data source {data!r} (split {split!r}) has no documents")
    return docs


def teacher_cache_main(teacher: str, data: str, out: str | os.PathLike, *, k: int = 32, temperature: float = 1.0,
                       seq_len: int = 512, split: str = "train", text_field: str = "text",
                       max_docs: int | None = None, revision: str | None = None, batch_size: int = 8,
                       device: str = "auto", dtype: str = "auto", logprob_dtype: str = "float32",
                       progress: bool = True, reuse: bool = True) -> Path:
    """Tokenise a data source into <= seq_len segments and capture the teacher on them; returns the cache dir.

    reuse: when `out` already holds an intact cache of this teacher, tokenizer, data, k, temperature
    and storage dtype, return it instead of capturing again.
    """
    from .data import tokenize_segments
    from quasar_model.teacher_outputs.capture import capture_teacher_cache, load_teacher

    out = Path(out)
    teacher_path = resolve_teacher(teacher, progress=progress)
    docs = read_documents(data, split=split, text_field=text_field, max_docs=max_docs)
    # names the text and how it was cut; the tokenizer is named by its own fingerprint in the meta
    fp = hashlib.sha256(f"{corpus.fingerprint(docs)}|seq_len={seq_len}|eos-per-doc".encode()).hexdigest()
    if reuse:
        from transformers import AutoTokenizer

        from quasar_model.tokenization import tokenizer_fingerprint

        tok = AutoTokenizer.from_pretrained(teacher_path, revision=revision)
        want = dict(teacher_id=teacher_path, teacher_revision=revision, k=k, temperature=float(temperature),
                    data_fingerprint=fp, logprob_dtype=logprob_dtype,
                    tokenizer_fingerprint=tokenizer_fingerprint(tok))
        found = find_cache(out, want)
        if found is not None:
            return found
    model, tokenizer = load_teacher(teacher_path, revision=revision, dtype=dtype, device=device)
    segments = list(tokenize_segments(docs, tokenizer, seq_len))
    return capture_teacher_cache(model, tokenizer, segments, out, k=k, temperature=temperature,
                                 teacher_id=teacher_path, teacher_revision=revision, data_fingerprint=fp,
                                 batch_size=batch_size, progress=progress, logprob_dtype=logprob_dtype)


def find_cache(out: Path, want: dict) -> Path | None:
    """An intact cache under `out` whose meta has every field of `want`, else None."""
    from quasar_model.teacher_outputs.cache import open_teacher_cache

    if not out.is_dir():
        return None
    for sub in sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            meta = asdict(open_teacher_cache(sub).meta)
        except TeacherCacheError:
            continue
        if all(meta.get(key) == value for key, value in want.items()):
            return sub
    return None


def text_cache_main(tokenizer_path: str, data: str, out: str | os.PathLike, *, seq_len: int = 512,
                    split: str = "train", text_field: str = "text", max_docs: int | None = None) -> Path:
    """Sequence-level KD data: texts (e.g. teacher generations) tokenised by the student's tokenizer."""
    from transformers import AutoTokenizer

    from .data import tokenize_segments
    from .sequence_kd import text_fingerprint, write_text_cache

    docs = read_documents(data, split=split, text_field=text_field, max_docs=max_docs)
    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    return write_text_cache(tok, tokenize_segments(docs, tok, seq_len), out,
                            data_fingerprint=text_fingerprint(docs, seq_len), source=data)


def cmd_teacher_generate(args) -> int:
    """Teacher continuations of document openings, as a jsonl text dataset (sequence-level KD)."""
    from quasar_model.teacher_outputs.capture import load_teacher

    from .sequence_kd import generate_teacher_texts, write_teacher_texts

    resolve_device(args.device)
    teacher = resolve_teacher(args.teacher)
    docs = read_documents(args.data, split=args.split, text_field=args.text_field, max_docs=args.max_docs)
    model, tok = load_teacher(teacher, revision=args.revision, dtype=args.dtype, device=args.device)
    prompts = [d[:args.prompt_chars] for d in docs]
    texts = generate_teacher_texts(model, tok, prompts, args.max_new_tokens, temperature=args.temperature,
                                   seed=args.seed)
    print(write_teacher_texts(args.out, texts))
    return 0


def _check_counts(args, *names: str) -> None:
    """Numeric flags that must be >= 1, refused before anything is loaded."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _loading_teacher(fn):
    """A command that loads a teacher: a name the Hub (or the cache, offline) does not have is one
    line naming it, not transformers' traceback."""
    def run(args):
        try:
            return fn(args)
        except OSError as e:
            if getattr(e, "filename", None):  # a file of ours (disk full, permissions): say which
                raise ValueError(f"{e.strerror or type(e).__name__}: {e.filename}") from None
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"teacher {getattr(args, 'teacher', None)!r} cannot be loaded: {first}") from None
    return run


def cmd_teacher_cache(args) -> int:
    _check_counts(args, "k", "seq_len", "batch_size", "max_docs")
    if not args.temperature > 0:
        raise ValueError(f"--temperature must be > 0, got {args.temperature}")
    if args.text_only:
        if not args.tokenizer:
            raise ValueError("teacher-cache --text-only needs --tokenizer (the student's tokenizer directory)")
        print(text_cache_main(args.tokenizer, args.data, args.out, seq_len=args.seq_len, split=args.split,
                              text_field=args.text_field, max_docs=args.max_docs))
        return 0
    if not args.teacher:
        raise ValueError("teacher-cache needs --teacher (or --text-only --tokenizer for sequence-level KD)")
    resolve_device(args.device)  # a device this machine lacks: one error line before anything loads
    with _term_as_interrupt() as signals:
        try:
            path = teacher_cache_main(args.teacher, args.data, args.out, k=args.k, temperature=args.temperature,
                                      seq_len=args.seq_len, split=args.split, text_field=args.text_field,
                                      max_docs=args.max_docs, revision=args.revision, batch_size=args.batch_size,
                                      device=args.device, dtype=args.dtype, logprob_dtype=args.logprob_dtype,
                                      progress=not args.no_progress, reuse=not args.recapture)
        except KeyboardInterrupt as e:
            # one line, no traceback: what is kept, and how to go on
            how = "run the same command again to resume" if getattr(e, "partial", None) else "nothing was kept"
            what = str(e) if str(e) else "interrupted before the capture started"
            print(f"quasar teacher-cache: {what}; {how}", file=sys.stderr)
            return 128 + (signals[-1] if signals else signal.SIGINT)
    if int(os.environ.get("RANK", "0")) == 0:
        print(path)
    return 0


@contextlib.contextmanager
def _term_as_interrupt():
    """SIGTERM (pm2, systemd, docker stop) stops a capture as Ctrl-C does: a KeyboardInterrupt, so
    it ends at a clean point with what it finished kept. Yields the signals received."""
    received: list[int] = []

    def on_term(signum, frame):
        received.append(signum)
        signal.signal(signal.SIGTERM, previous)  # a second one is not for waiting
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def cmd_distill(args) -> int:
    if args.overrides:  # the old spelling: still applied, before --set (so --set wins)
        logging.getLogger("distill").warning("deprecated flag", extra={"fields": {
            "detail": "positional key=value overrides are deprecated; use --set key=value"}})
    cfg = load_config(args.config, [*args.overrides, *args.set])  # before torch: a bad file fails at once
    resolve_device(cfg.device)
    from .trainer import run

    records = run(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        losses = [r["loss"] for r in records if "loss" in r]
        kls = [r["heldout_kl"] for r in records if "heldout_kl" in r]
        if losses:
            print(f"trained to step {cfg.steps}: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
        if len(kls) >= 2:
            print(f"held-out KL {kls[0]:.4f} -> {kls[-1]:.4f}")
        print(f"outputs in {cfg.output_dir} (metrics.jsonl, loss_curve.png, final/)")
    return 0


def _layer_list(text: str) -> list[int]:
    """'4-19' / '1,3,5' / 'none' -> layer indices."""
    if text.lower() == "none":
        return []
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        try:
            out.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
        except ValueError:
            raise argparse.ArgumentTypeError(f"layers: expected e.g. 4-19, 1,3,5 or none, got {text!r}") from None
    return out


def _refuse_early(teacher: str, revision: str | None) -> None:
    """A teacher whose config does not map is refused before its weights are read (a 9B teacher
    takes minutes to load). The text config: AutoModelForCausalLM loads the text model of a
    vision-language checkpoint (Qwen3.5's), and that is the teacher."""
    from transformers import AutoConfig

    from quasar_model.conversion import check_teacher

    try:
        tc = AutoConfig.from_pretrained(teacher, revision=revision)
    except (OSError, ValueError):
        return  # load_teacher says what is wrong with it
    check_teacher(tc.get_text_config())


def cmd_init_student(args) -> int:
    """A Quasar-Long student holding a teacher's weights, saved with the teacher's tokenizer."""
    import torch

    from quasar_model.teacher_outputs.capture import load_teacher

    from quasar_model.conversion import init_student, logit_gap

    resolve_device(args.device)
    teacher = resolve_teacher(args.teacher)
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected key=value (a QuasarLongConfig field)")
        overrides[key] = json_or_text(value)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    _refuse_early(teacher, args.revision)
    model, tok = load_teacher(teacher, revision=args.revision, dtype=dtype, device=args.device)
    torch.manual_seed(args.seed)         # what is not copied from the teacher (gates, routers) is seeded
    student = init_student(
        model, hybrid_layers=args.hybrid_layers, cycle=args.cycle.split(",") if args.cycle else None,
        alpha_init=args.alpha, replacement_mode="replace" if args.replace else "add",
        num_experts=args.experts, experts_per_tok=args.experts_per_tok,
        moe_intermediate_size=args.moe_intermediate_size, first_k_dense_replace=args.first_k_dense,
        overrides=overrides, dtype=dtype, branch_from_attention=not args.fresh_branches,
    ).to(model.device)
    g = torch.Generator().manual_seed(0)
    probe = torch.randint(0, min(tok.vocab_size, model.config.vocab_size), (2, 64), generator=g)
    gap = logit_gap(student.eval(), model, probe)
    out = Path(args.out)
    student.save_pretrained(out)
    tok.save_pretrained(out)
    report = {"teacher": args.teacher, "revision": args.revision,
              "hybrid_layers": student.config.hybrid_attention_layers,
              "branches": {i: student.config.branch_kind(i) for i in student.config.hybrid_attention_layers},
              "hybrid_replacement_mode": student.config.hybrid_replacement_mode,
              "hybrid_alpha_init": student.config.hybrid_alpha_init, "num_experts": student.config.num_experts,
              "max_abs_logit_gap_to_teacher": gap}
    (out / "structural_init.json").write_text(json.dumps(report, indent=1))
    print(f"student in {out}: {sum(p.numel() for p in student.parameters()) / 1e6:.2f} M parameters, "
          f"max |logit - teacher logit| = {gap:.3g} on a random probe")
    return 0


def add_commands(subparsers) -> None:
    """Register `teacher-cache` and `distill` on an argparse subparsers object."""
    p = subparsers.add_parser("teacher-cache", help="capture a teacher's top-k log-probs on a dataset")
    p.add_argument("--teacher", default=None, help=f"Hub name or local checkpoint; '{TINY_TEACHER}' = the project's tiny teacher")
    p.add_argument("--text-only", action="store_true",
                   help="no teacher: cache the text itself (e.g. teacher generations) for sequence-level KD; "
                        "train it with loss.ce_weight=1")
    p.add_argument("--tokenizer", default=None, help="with --text-only: the student's tokenizer directory")
    p.add_argument("--revision", default=None, help="Hub revision (commit) of the teacher")
    p.add_argument("--data", required=True,
                   help="local .jsonl/.json/.txt/.parquet file or directory, a Hub dataset name (streamed), "
                        "or corpus:train / corpus:heldout (the local corpus)")
    p.add_argument("--split", default="train", help="dataset split")
    p.add_argument("--text-field", default="text", help="the documents' text column")
    p.add_argument("--max-docs", type=int, default=None,
                   help="read at most this many documents (the first ones; validators' held-out documents are "
                        "drawn by each round's seed from the whole dataset, so no fixed choice is the held-out set)")
    p.add_argument("--k", type=int, default=32, help="teacher ids kept per position")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the stored log-probs")
    p.add_argument("--seq-len", type=int, default=512, help="segment length (<= the student's data.seq_len)")
    p.add_argument("--out", required=True, help="directory; the cache is written to OUT/<content hash>/")
    p.add_argument("--batch-size", type=int, default=8, help="segments per teacher forward")
    p.add_argument("--device", default="auto", help=f"teacher device: {DEVICE_HELP}")
    p.add_argument("--dtype", default="auto", help="teacher weights: auto | float32 | bfloat16 | float16")
    p.add_argument("--logprob-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="storage dtype of the log-probs (bfloat16/float16 halve the cache)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--recapture", action="store_true", help="capture even if OUT already holds this cache")
    p.set_defaults(func=_loading_teacher(cmd_teacher_cache))

    p = subparsers.add_parser("teacher-generate", help="teacher continuations as a jsonl text dataset "
                                                       "(sequence-level KD across tokenizers)")
    p.add_argument("--teacher", required=True, help=f"Hub name or local checkpoint; '{TINY_TEACHER}' = the project's tiny teacher")
    p.add_argument("--revision", default=None, help="Hub revision (commit) of the teacher")
    p.add_argument("--data", required=True, help="where the prompts come from (as for teacher-cache)")
    p.add_argument("--split", default="train", help="dataset split")
    p.add_argument("--text-field", default="text", help="the documents' text column")
    p.add_argument("--max-docs", type=int, default=None, help="read at most this many documents")
    p.add_argument("--prompt-chars", type=int, default=200, help="each prompt is a document's first characters")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per prompt")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default="auto", help=f"teacher device: {DEVICE_HELP}")
    p.add_argument("--dtype", default="auto", help="teacher weights: auto | float32 | bfloat16 | float16")
    p.add_argument("--out", required=True, help="the .jsonl file to write")
    p.set_defaults(func=_loading_teacher(cmd_teacher_generate))

    p = subparsers.add_parser("init-student", help="build a Quasar-Long student from a teacher's weights "
                                                   "(structural distillation, stage 1)")
    p.add_argument("--teacher", required=True,
                   help="qwen3/llama/mistral, Qwen3.5 or Qwen3.5-MoE (text model), GLM-4 or GLM-4.5 (glm4_moe) "
                        f"checkpoint (Hub name or local); '{TINY_TEACHER}' = the project's tiny teacher")
    p.add_argument("--revision", default=None, help="Hub revision (commit) of the teacher")
    p.add_argument("--out", required=True, help="directory for the student (save_pretrained + tokenizer)")
    p.add_argument("--hybrid-layers", type=_layer_list, default=None,
                   help="layers that get a recurrent branch: e.g. 4-19, 1,3,5 or none (default: all but the "
                        "first fifth, as in the preview)")
    p.add_argument("--cycle", default=None, help="branch kinds cycled over the hybrid layers, e.g. quasar,raven,gla")
    p.add_argument("--alpha", type=float, default=-15.0,
                   help="hybrid_alpha_init: -15 starts the branches off (student == teacher); e.g. -4 "
                        "lets them learn from the first step")
    p.add_argument("--replace", action="store_true",
                   help="hybrid layers become the branch alone (no attention): the Quasar-10B swap; train with "
                        "loss.hidden_mse_weight > 0 so each branch learns its attention's output")
    p.add_argument("--experts", type=int, default=0, help="routed experts per MoE layer (0: dense everywhere)")
    p.add_argument("--experts-per-tok", type=int, default=2, help="with --experts: experts each token is routed to")
    p.add_argument("--moe-intermediate-size", type=int, default=None,
                   help="with --experts: each expert's hidden size (default: the teacher's intermediate_size // 4)")
    p.add_argument("--first-k-dense", type=int, default=1, help="with --experts: leading layers kept dense")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any other QuasarLongConfig field (JSON value), e.g. --set nope_after_position=8192")
    p.add_argument("--fresh-branches", action="store_true",
                   help="leave the branches at their fresh init instead of copying the attention's q/k/v/o")
    p.add_argument("--seed", type=int, default=0, help="seed of what is not copied from the teacher (gates, routers)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="teacher and student weights while building (bfloat16 halves the memory of large teachers; "
                        "the trainer keeps fp32 master weights either way)")
    p.add_argument("--device", default="auto", help=f"teacher and student device: {DEVICE_HELP}")
    p.set_defaults(func=_loading_teacher(cmd_init_student))

    p = subparsers.add_parser("distill", help="distill a teacher cache into a Quasar-Long student")
    p.add_argument("config", help="JSON or YAML config file (see distill/config.py)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config value by its dotted key, e.g. --set optim.lr=1e-3 --set steps=200 (repeatable)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=argparse.SUPPRESS)  # deprecated: --set
    p.set_defaults(func=cmd_distill)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distill.cli", description=__doc__.split("\n")[0])
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TeacherCacheError) as e:   # config, data and cache errors: the message says it all
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
