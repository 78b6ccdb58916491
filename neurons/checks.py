"""Validator-side checks of a fetched checkpoint directory, cheapest and most decisive first.

    manifest  every file listed, allowed, and byte-identical to the manifest (nothing else read)
    config    config.json: size cap, strict JSON, typed schema, model_type, QuasarLongConfig,
              cheap competition bounds, then the exact parameter count on the `meta` device
    header    safetensors headers only: every tensor's name/shape/dtype equals the meta model's
              state_dict, offsets tile the file exactly; no tensor data read yet
    weights   tensors loaded one slice at a time; any NaN/Inf refuses the submission

Nothing from the submission is executed or unpickled: the model is built from our own library,
weights are only ever read through safetensors. Each check raises `SubmissionRejected` with a
reason and the stage that refused it; `check_submission` runs them in order.
"""
from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from eval.budget import model_cost
from eval.checkpoint_layout import (
    FLOAT_DTYPES, MAX_HEADER_BYTES, LayoutError, TensorInfo, is_int, read_safetensors_header,
)

from .commitment import Commitment, unbound_reason
from .manifest import (
    INDEX_NAME, Manifest, SubmissionRejected, read_manifest, read_small_file, strict_json_loads, verify_manifest,
)

MAX_CONFIG_BYTES = 64 << 10  # a real config.json is ~2-3 KiB; the cap also bounds every list in it
MAX_INDEX_BYTES = 16 << 20
# A header's size follows from the tensors the config implies: each entry is its name plus a
# dtype, a shape of at most 8 dims and two offsets (under 256 bytes of JSON however large the
# numbers); __metadata__ and alignment padding get a fixed allowance. A real tiny header is ~10 KB,
# a 9B model's a few hundred KB; a bloated one is refused from its first 8 bytes, unread.
HEADER_BYTES_PER_TENSOR = 256
HEADER_METADATA_BYTES = 64 << 10
SLICE_BYTES = 64 << 20  # NaN scan reads at most this much of one tensor at a time

# Keys transformers writes into config.json that are not QuasarLongConfig fields.
BOOKKEEPING_KEYS = {"architectures", "model_type", "transformers_version", "dtype", "torch_dtype"}
ARCHITECTURES = ["QuasarLongForCausalLM"]
CONFIG_DTYPES = {"float32", "bfloat16", "float16"}
# Keys that make transformers import or run code named by the checkpoint, or change how weights
# are interpreted: refused by name with a sharper reason than "unknown key".
CODE_KEYS = {"auto_map", "custom_pipelines", "quantization_config"}


@dataclass(frozen=True)
class StudentLimits:
    """A competition's bounds on a student. The first five come from the competition file.

    The defaulted caps bound work the config could make the validator do in Python (loops over
    engram tables, n-gram lags, conv taps, model loops) that the parameter count does not see.
    """
    max_total_params: int
    vocab_size: int  # exact: the student shares the competition tokenizer (KL needs aligned ids)
    max_layers: int
    max_hidden: int
    allowed_model_type: str = "quasar_long"
    max_loops: int = 4
    max_active_params: int | None = None  # competition: student.max_active_params_vs_teacher * teacher.params
    max_engram_tables: int = 64
    max_ngram_order: int = 8
    max_engram_conv_kernel: int = 16
    # latent memory runs a Python step per segment per layer: on `tiny` at 2,048 tokens a segment of
    # 16 costs 1.1x a model without it (as the default 64 does), 4 costs 2.3x, 1 costs 3.9x
    min_latent_memory_segment: int = 16
    # Per-token compute the parameter count does not see (eval.budget's terms): the attention and the
    # recurrent states scale with heads x head_dim (attention reads T keys per head dim; a delta-rule
    # state is head_dim^2 per head) and raven's with its slots, while their projections' parameters
    # scale with hidden_size too, so a narrow model could make them arbitrarily large for its count.
    # Attention width (num_attention_heads * head_dim) is bounded by max_hidden.
    max_head_dim: int = 256              # Qwen3.5's; preview's is 128
    max_raven_slots: int = 1024          # preview's is 64
    # competition budget.max_flops and the plan it applies to (eval.budget.plan): the student's
    # estimated evaluation FLOPs, which see loops and attention/recurrent terms, at most this
    max_eval_flops: float | None = None
    eval_plan: tuple = ()


@dataclass(frozen=True)
class SubmissionSummary:
    model_hash: str
    total_params: int
    active_params: int
    tensor_count: int
    weight_bytes: int  # bytes of tensor data across all safetensors files
    dtypes: dict[str, int] = field(default_factory=dict)  # safetensors dtype -> tensor count
    files: tuple[str, ...] = ()


@dataclass(frozen=True)
class CheckedSubmission:
    config: object  # QuasarLongConfig (imported lazily: importing torch is not needed to reject)
    manifest: Manifest
    summary: SubmissionSummary


def _reject(stage: str, reason: str) -> SubmissionRejected:  # stage first, as a Submission records them
    return SubmissionRejected(reason, stage)


# ================================================================================== config
def _type_ok(annotation: str, v) -> bool:
    """Whether a JSON value fits a QuasarLongConfig field annotation (kept as a string)."""
    if annotation == "int":
        return is_int(v)
    if annotation == "float":
        try:  # float() of a 4000-digit integer overflows rather than returning inf
            return (is_int(v) or isinstance(v, float)) and math.isfinite(float(v))
        except OverflowError:
            return False
    if annotation == "bool":
        return isinstance(v, bool)
    if annotation == "str":
        return isinstance(v, str) and len(v) <= 64
    if annotation == "int | None":
        return v is None or is_int(v)
    if annotation == "list[int] | None":
        return v is None or (isinstance(v, list) and all(is_int(x) for x in v))
    if annotation == "list[str] | None":
        return v is None or (isinstance(v, list) and all(isinstance(x, str) and len(x) <= 64 for x in v))
    if annotation == "int | list[int] | None":
        return v is None or is_int(v) or (isinstance(v, list) and all(is_int(x) for x in v))
    raise TypeError(annotation)


def check_config_schema(raw: dict, limits: StudentLimits) -> None:
    """model_type first (the cheapest decisive check), then every key's presence and JSON type.

    QuasarLongConfig checks values, not types (a string where a float belongs would pass it and
    fail later, somewhere less clear), so types are checked here against its own annotations.
    """
    model_type = raw.get("model_type")
    if model_type != limits.allowed_model_type:
        raise _reject("config", f"config.json model_type {str(model_type)[:40]!r} is not {limits.allowed_model_type!r}")
    from quasar_model import QuasarLongConfig  # here: it loads torch (seconds); a bad model_type must not wait

    fields = QuasarLongConfig.__annotations__
    for key, value in raw.items():
        if key in CODE_KEYS:
            raise _reject("config", f"config.json key {key!r} is not accepted "
                                    "(it makes loaders run code or reinterpret the weights)")
        if key in BOOKKEEPING_KEYS:
            continue
        if key not in fields:
            raise _reject("config", f"config.json has the unknown key {key[:60]!r}")
        annotation = fields[key]
        if not isinstance(annotation, str):  # evaluated annotations (no `from __future__`): spell them
            annotation = annotation.__name__ if isinstance(annotation, type) else str(annotation)
        try:
            ok = _type_ok(annotation, value)
        except TypeError:  # a field type this checker does not know: fail closed, loudly
            raise _reject("config", f"config.json field {key!r} has a type the validator cannot check") from None
        if not ok:
            raise _reject("config", f"config.json field {key!r} has the wrong type or value: "
                                    f"{str(value)[:60]!r} (expected {fields[key]})")
    if "architectures" in raw and raw["architectures"] != ARCHITECTURES:
        raise _reject("config", f"config.json architectures {str(raw['architectures'])[:80]} is not {ARCHITECTURES}")
    for key in ("dtype", "torch_dtype"):
        if key in raw and not (isinstance(raw[key], str) and raw[key] in CONFIG_DTYPES):
            raise _reject("config", f"config.json {key} {str(raw[key])[:40]!r} is not one of {sorted(CONFIG_DTYPES)}")
    if "transformers_version" in raw and not (isinstance(raw["transformers_version"], str)
                                               and len(raw["transformers_version"]) <= 32):
        raise _reject("config", "config.json transformers_version is not a short string")


def build_config(raw: dict):
    """QuasarLongConfig from the checked dict; its own validation names the offending field."""
    from quasar_model import QuasarLongConfig  # here, as in check_config_schema: it loads torch

    fields = {k: v for k, v in raw.items() if k not in BOOKKEEPING_KEYS}
    try:
        return QuasarLongConfig(**fields)
    except (ValueError, TypeError) as e:
        raise _reject("config", f"config.json is not a valid QuasarLongConfig: {str(e)[:300]}") from None


def check_config_bounds(config, limits: StudentLimits) -> None:
    """Cheap field checks against the competition, before anything is built, even on meta.

    These are what make a config bomb (vocab 10**9, 10**6 layers, a huge engram) cost
    microseconds: the meta build is cheap per tensor but not per module, and engram computes its
    hash primes in Python at construction.
    """
    def over(field_name: str, value, bound, rule: str):
        raise _reject("config", f"config.json {field_name}={value} is outside the competition bounds ({rule} {bound})")

    if config.vocab_size != limits.vocab_size:
        over("vocab_size", config.vocab_size, limits.vocab_size, "must equal the competition tokenizer's")
    if config.num_hidden_layers > limits.max_layers:
        over("num_hidden_layers", config.num_hidden_layers, limits.max_layers, "at most")
    if config.hidden_size > limits.max_hidden:
        over("hidden_size", config.hidden_size, limits.max_hidden, "at most")
    if config.num_attention_heads > limits.max_hidden:  # one Python entry per head per layer
        over("num_attention_heads", config.num_attention_heads, limits.max_hidden, "at most max_hidden")
    if config.head_dim > limits.max_head_dim:
        over("head_dim", config.head_dim, limits.max_head_dim, "at most")
    width = config.num_attention_heads * config.head_dim
    if width > limits.max_hidden:
        over("num_attention_heads * head_dim", width, limits.max_hidden, "attention width at most max_hidden")
    if "raven" in {config.branch_kind(i) for i in config.hybrid_attention_layers} \
            and config.hybrid_raven_slots > limits.max_raven_slots:
        over("hybrid_raven_slots", config.hybrid_raven_slots, limits.max_raven_slots, "at most")
    if config.num_loops > limits.max_loops:
        over("num_loops", config.num_loops, limits.max_loops, "at most")
    if config.latent_memory_layers and config.latent_memory_segment < limits.min_latent_memory_segment:
        over("latent_memory_segment", config.latent_memory_segment, limits.min_latent_memory_segment, "at least")
    if config.engram_layers:
        orders, heads = config.engram_ngram_orders, config.engram_num_heads
        tables = len(orders) * heads
        if tables > limits.max_engram_tables:
            over("engram tables (len(engram_ngram_orders) * engram_num_heads)", tables, limits.max_engram_tables, "at most")
        if max(orders) > limits.max_ngram_order:
            over("engram_ngram_orders", max(orders), limits.max_ngram_order, "max order at most")
        if not 1 <= config.engram_conv_kernel <= limits.max_engram_conv_kernel:
            over("engram_conv_kernel", config.engram_conv_kernel, f"[1, {limits.max_engram_conv_kernel}]", "in")
        # Each table has a prime number of rows >= slots // tables: a lower bound on the table
        # parameters that needs no build (and keeps the Python prime search small).
        table_params = tables * max(config.engram_slots // tables, 2) * (config.engram_dim // heads)
        if table_params > limits.max_total_params:
            over("engram_slots", config.engram_slots, f"{limits.max_total_params:,}",
                 f"its tables alone hold >= {table_params:,} parameters; total at most")


def count_parameters(config, limits: StudentLimits) -> dict[str, int]:
    """Exact parameter counts on the meta device (no memory), refused over the competition cap."""
    from quasar_model.report import parameter_counts  # torch, as above

    try:
        counts = parameter_counts(config)
    except Exception as e:  # our own library refusing a shape (overflow, bad sizes): still a rejection
        first_line = (str(e).splitlines() or [""])[0][:200]
        raise _reject("config", f"config.json does not build a model: {type(e).__name__}: {first_line}") from None
    if counts["total"] > limits.max_total_params:
        raise _reject("config", f"model has {counts['total']:,} parameters, "
                                f"over the competition cap of {limits.max_total_params:,}")
    if limits.max_active_params is not None and counts["active"] > limits.max_active_params:
        raise _reject("config", f"model has {counts['active']:,} active parameters, over the competition cap of "
                                f"{limits.max_active_params:,} (student.max_active_params_vs_teacher x teacher.params: "
                                "a student must be smaller than its teacher)")
    if limits.max_eval_flops is not None and limits.eval_plan:
        cost = model_cost(config, counts)
        flops = sum(cost.axis_flops(a) for a in limits.eval_plan)
        if flops > limits.max_eval_flops:
            raise _reject("config", f"evaluating this model costs an estimated {flops:.3e} FLOPs, over the "
                                    f"competition's budget.max_flops of {limits.max_eval_flops:.3e} (eval.budget: "
                                    f"num_loops={config.num_loops} x {cost.layer_params:,} active layer parameters, "
                                    f"attention width {cost.attention_width:,} summed over layers, "
                                    f"{cost.recurrent:,} recurrent FLOPs per token; `quasar eval` prints the estimate)")
    return counts


def _check_generation_config(directory: Path, manifest: Manifest) -> None:
    # Not used to build anything, but loaders read it: keep it a small JSON object.
    if manifest.entry("generation_config.json") is not None:
        raw = read_small_file(directory / "generation_config.json", MAX_CONFIG_BYTES, "generation_config.json", "config")
        if not isinstance(strict_json_loads(raw, "generation_config.json", "config"), dict):
            raise _reject("config", "generation_config.json is not a JSON object")


def check_config(directory: str | os.PathLike, limits: StudentLimits, manifest: Manifest):
    """(config, parameter counts) of a checkpoint, or SubmissionRejected(stage="config")."""
    directory = Path(directory)
    if manifest.entry("config.json") is None:
        raise _reject("config", "config.json is missing")
    raw = read_small_file(directory / "config.json", MAX_CONFIG_BYTES, "config.json", "config")
    body = strict_json_loads(raw, "config.json", "config")
    if not isinstance(body, dict):
        raise _reject("config", "config.json is not a JSON object")
    check_config_schema(body, limits)
    config = build_config(body)
    check_config_bounds(config, limits)
    counts = count_parameters(config, limits)
    _check_generation_config(directory, manifest)
    return config, counts


# ================================================================================== headers
def header_cap(tensor_names) -> int:
    """The most header bytes a safetensors file holding (some of) these tensors may need."""
    return HEADER_METADATA_BYTES + sum(len(n.encode()) + HEADER_BYTES_PER_TENSOR for n in tensor_names)


def expected_tensors(config) -> tuple[dict[str, tuple[tuple[int, ...], object]], dict[str, str]]:
    """From the meta model: name -> (shape, torch dtype) of every stored tensor, and tied aliases.

    A state_dict entry that is the same tensor object as an earlier one (tied lm_head) is an alias:
    save_pretrained stores it once, under the first name, and so must a submission.
    """
    from quasar_model.report import build_on_meta  # torch, as above

    model = build_on_meta(config)
    expected, aliases, seen = {}, {}, {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            aliases[name] = seen[id(tensor)]
            continue
        seen[id(tensor)] = name
        expected[name] = (tuple(tensor.shape), tensor.dtype)
    return expected, aliases


def _safetensors_dtype(torch_dtype) -> str | None:
    import torch

    return {torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
            torch.uint8: "U8", torch.bool: "BOOL"}.get(torch_dtype)


def _weight_files(directory: Path, manifest: Manifest) -> tuple[list[str], dict[str, str] | None]:
    """The safetensors files to read and, when sharded, the index's tensor -> file map."""
    shards = sorted(n for n in manifest.names if n.endswith(".safetensors"))
    if not shards:
        raise _reject("header", "checkpoint has no .safetensors weights")
    if manifest.entry(INDEX_NAME) is None:
        if shards != ["model.safetensors"]:
            raise _reject("header", f"weights {shards[:5]} need {INDEX_NAME}, or one file named model.safetensors")
        return shards, None
    raw = read_small_file(directory / INDEX_NAME, MAX_INDEX_BYTES, INDEX_NAME, "header")
    index = strict_json_loads(raw, INDEX_NAME, "header")
    if not isinstance(index, dict) or not set(index) <= {"metadata", "weight_map"} or "weight_map" not in index:
        raise _reject("header", f"{INDEX_NAME} must be an object with 'weight_map' (and optional 'metadata')")
    weight_map = index["weight_map"]
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise _reject("header", f"{INDEX_NAME} weight_map must map tensor names to file names")
    referenced = set(weight_map.values())
    if referenced != set(shards):
        unknown, unused = sorted(referenced - set(shards))[:3], sorted(set(shards) - referenced)[:3]
        raise _reject("header", f"{INDEX_NAME} references files {unknown} not in the checkpoint, or leaves {unused} unused")
    return shards, weight_map


def check_headers(directory: str | os.PathLike, manifest: Manifest, config) -> list[TensorInfo]:
    """Every tensor the files declare is exactly one the meta model expects, and vice versa."""
    directory = Path(directory)
    shards, weight_map = _weight_files(directory, manifest)
    expected, aliases = expected_tensors(config)  # first: it sizes the header cap
    cap = min(MAX_HEADER_BYTES, header_cap(expected))
    declared: dict[str, TensorInfo] = {}
    for shard in shards:
        try:
            declared_here = read_safetensors_header(directory / shard, shard, cap)
        except LayoutError as e:
            raise _reject("header", str(e)) from None
        for t in declared_here:
            if t.name in declared:
                raise _reject("header", f"tensor {t.name[:120]!r} is stored twice ({declared[t.name].file} and {shard})")
            if weight_map is not None and weight_map.get(t.name) != shard:
                raise _reject("header", f"tensor {t.name[:120]!r} is in {shard} "
                                        f"but {INDEX_NAME} says {weight_map.get(t.name)!r}")
            declared[t.name] = t
    if weight_map is not None and set(weight_map) != set(declared):
        absent = sorted(set(weight_map) - set(declared))[:3]
        raise _reject("header", f"{INDEX_NAME} lists tensors the shards do not hold: {absent}")

    for name in sorted(declared):
        if name in aliases:
            raise _reject("header", f"tensor {name!r} is tied to {aliases[name]!r} and must not be stored separately")
        if name not in expected:
            raise _reject("header", f"unexpected tensor {name[:120]!r} (not in the Quasar-Long model for this config)")
    missing = sorted(set(expected) - set(declared))
    if missing:
        raise _reject("header", f"{len(missing)} tensor(s) missing, e.g. {missing[:3]}")
    for name, t in declared.items():
        shape, torch_dtype = expected[name]
        if t.shape != shape:
            raise _reject("header", f"tensor {name!r} has shape {list(t.shape)}, the model expects {list(shape)}")
        if torch_dtype.is_floating_point:
            if t.dtype not in FLOAT_DTYPES:
                raise _reject("header", f"tensor {name!r} has dtype {t.dtype}; "
                                        f"weights must be one of {sorted(FLOAT_DTYPES)}")
        elif t.dtype != _safetensors_dtype(torch_dtype):
            raise _reject("header", f"tensor {name!r} has dtype {t.dtype}, the model's buffer is {torch_dtype}")
    return list(declared.values())


# ================================================================================== weights
def check_finite(directory: str | os.PathLike, tensors: list[TensorInfo]) -> None:
    """Load float tensors through safetensors, a slice at a time, and refuse any NaN/Inf.

    Slicing along the first dimension keeps memory to ~SLICE_BYTES however large the embedding.
    """
    import torch
    from safetensors import safe_open

    directory = Path(directory)
    by_file: dict[str, list[TensorInfo]] = {}
    for t in tensors:
        if t.dtype in FLOAT_DTYPES:
            by_file.setdefault(t.file, []).append(t)
    for file_name, infos in sorted(by_file.items()):
        try:
            with safe_open(str(directory / file_name), framework="pt", device="cpu") as f:
                for t in infos:
                    if not t.shape:
                        chunks = [f.get_tensor(t.name)]
                    else:
                        row_bytes = max(1, (t.end - t.begin) // max(t.shape[0], 1))
                        step = max(1, SLICE_BYTES // row_bytes)
                        sl = f.get_slice(t.name)
                        chunks = (sl[a:a + step] for a in range(0, t.shape[0], step))
                    for chunk in chunks:
                        bad = int((~torch.isfinite(chunk)).sum())
                        if bad:
                            raise _reject("weights", f"tensor {t.name!r} in {file_name} has {bad} "
                                                     "non-finite value(s) (NaN/Inf)")
        except SubmissionRejected:
            raise
        except Exception as e:  # safetensors refusing the file after our header checks passed
            raise _reject("weights", f"{file_name} cannot be read by safetensors: {str(e)[:200]}") from None


# ================================================================================== all
def check_submission(directory: str | os.PathLike, limits: StudentLimits, *, manifest: Manifest | None = None,
                     commitment: Commitment | None = None, hotkey: str | None = None) -> CheckedSubmission:
    """Run every check in order; the parsed config and a summary, or SubmissionRejected.

    `manifest` defaults to the directory's manifest.json. With `commitment` (and the `hotkey` that
    made it), the manifest's model hash must be the one it binds, so a fetched checkpoint cannot be
    swapped for another.
    """
    directory = Path(directory)
    if manifest is None:
        manifest = read_manifest(directory)
    if commitment is not None:
        if hotkey is None:
            raise ValueError("checking against a commitment needs the hotkey that made it")
        if not commitment.matches(manifest.model_hash, hotkey):
            raise _reject("manifest", unbound_reason(manifest.model_hash, commitment, hotkey))
    verify_manifest(directory, manifest)
    config, counts = check_config(directory, limits, manifest)
    tensors = check_headers(directory, manifest, config)
    check_finite(directory, tensors)
    summary = SubmissionSummary(
        model_hash=manifest.model_hash,
        total_params=counts["total"],
        active_params=counts["active"],
        tensor_count=len(tensors),
        weight_bytes=sum(t.end - t.begin for t in tensors),
        dtypes=dict(Counter(t.dtype for t in tensors)),
        files=tuple(manifest.names),
    )
    return CheckedSubmission(config, manifest, summary)
