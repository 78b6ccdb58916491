"""What one submission's evaluation costs: the token plan of a competition and a FLOP estimate.

The plan lists every forward the evaluator (eval.evaluate.score_model) runs on a submission, per
axis, as groups of identical sequences (`Pass`): `count` sequences, each `prefill` tokens run in
parallel forwards, then `decode` tokens run one per forward, with full-vocabulary logits computed
at `logits` positions. The numbers are upper bounds taken from the competition alone (documents
may be shorter than seq_len, recall prompts are within 2 % under their length, decoding stops at
the first wrong token):

    heldout        documents x seq_len                     logits at every position (KL/CE)
    recall         per length multiple L: families x depth_bins x items_per_cell prompts of
                   L x context_len tokens, then max_answer_tokens - 1 decode steps (the first
                   answer token comes from the prefill); logits at the last position of each
                   prefill chunk and at each decode step
    fingerprint    fingerprint_probes x PROBE_LEN          logits at the last FP_POSITIONS
    continuations  CONTINUATIONS held-out prefixes of <= CONT_PROMPT tokens, CONT_TOKENS - 1
                   decode steps each (the degenerate gate's greedy output)

The competition file's `budget.tokens` must cover the sum (eval.competition refuses it otherwise);
its `budget.max_flops` caps the estimate below for a submitted config (neurons.checks, at fetch).

FLOPs of a pass, for a model summarised as a `ModelCost` (multiply-add = 2 FLOPs):

    n     = prefill + decode                 tokens of one sequence
    pairs = n (n + 1) / 2                    causal (query, key) pairs: the token at position t
                                             reads t keys (with or without a cache, chunked or not)
    one pass through the decoder layers =
            2 * layer_params * n             every active weight in the layers, once per token
          + 4 * attention_width * pairs      softmax attention: q.k and p.v, 2 FLOPs per head dim
                                             each; attention_width = sum over attention layers of
                                             num_attention_heads * head_dim
          + recurrent * n                    recurrent state reads/writes, linear in n
    flops = count * (num_loops * layers + 2 * head_params * logits)

A causal prefill of T tokens in L attention layers of width d thus costs ~2 * L * d * T^2 in
attention: quadratic, the term that dominates long recall prompts. Recurrent terms per token
and layer (H = num_attention_heads, d = head_dim, M = raven slots; 2 d^2 per head for each read
or write of a d x d state):
    quasar (delta rule)   6 H d^2    read S^T k, rank-1 write, output S^T q
    gla                   4 H d^2    decayed write k v^T, output S^T q
    raven (slot memory)   8 H d M    write and read of the key memory and of the value memory
    latent memory         4 S m      read softmax(q M^T) M over S slots of width m
Embedding lookups, norms, activations, routers' top-k and softmaxes are left out (linear in n and
small against the matmuls). This is an estimate for sizing budgets and timeouts, not a measurement.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # eval.competition imports this module; no import cycle at run time
    from eval.competition import Competition

# The shape of what eval.evaluate / eval.gates run besides the competition's own numbers.
PROBE_LEN = 32          # tokens per fingerprint probe
FP_POSITIONS = 8        # last positions of each probe whose logits the fingerprint reads
CONTINUATIONS = 8       # held-out prefixes the degenerate gate reads greedy output from
CONT_PROMPT = 32        # tokens of each prefix
CONT_TOKENS = 32        # greedy tokens generated after it


@dataclass(frozen=True)
class Pass:
    count: int      # sequences of this shape
    prefill: int    # tokens per sequence run in parallel forwards
    decode: int     # tokens per sequence then run one per forward
    logits: int     # positions per sequence whose full-vocabulary logits are computed
    forwards: int   # model calls per sequence (prefill chunks + decode steps): per-call overhead

    @property
    def tokens(self) -> int:
        return self.count * (self.prefill + self.decode)


@dataclass(frozen=True)
class AxisPlan:
    axis: str
    passes: tuple[Pass, ...]

    @property
    def tokens(self) -> int:
        return sum(p.tokens for p in self.passes)

    @property
    def sequences(self) -> int:
        return sum(p.count for p in self.passes)

    @property
    def forwards(self) -> int:
        return sum(p.count * p.forwards for p in self.passes)


def _chunks(n: int, chunk: int) -> int:
    return -(-n // chunk)


def plan(comp: "Competition") -> list[AxisPlan]:
    """Every forward one submission's evaluation runs under `comp`, per axis (upper bounds)."""
    h, r, s = comp.heldout, comp.recall, comp.score

    def decoded(count: int, prompt: int, steps: int) -> Pass:  # chunked prefill, then greedy steps
        calls = _chunks(prompt, r.prefill_chunk) + steps
        return Pass(count, prompt, steps, calls, calls)

    cells = len(r.families) * r.depth_bins * r.items_per_cell
    return [
        AxisPlan("heldout", (Pass(h.documents, h.seq_len, 0, h.seq_len, 1),)),
        AxisPlan("recall", tuple(decoded(cells, m * r.context_len, r.max_answer_tokens - 1) for m in r.lengths)),
        AxisPlan("fingerprint", (Pass(s.fingerprint_probes, PROBE_LEN, 0, FP_POSITIONS, 1),)),
        AxisPlan("continuations", (decoded(min(CONTINUATIONS, h.documents), min(CONT_PROMPT, max(1, h.seq_len // 2)),
                                           CONT_TOKENS - 1),)),
    ]


def planned_tokens(comp: "Competition") -> int:
    return sum(a.tokens for a in plan(comp))


@dataclass(frozen=True)
class ModelCost:
    """What the FLOP estimate needs of a model (see the module docstring for each term)."""
    layer_params: int       # active parameters of the decoder layers, one loop pass
    head_params: int        # the LM head (vocab_size * hidden_size)
    loops: int              # passes through the layers per token
    attention_width: int    # sum over softmax-attention layers of num_attention_heads * head_dim
    recurrent: int          # recurrent-state FLOPs per token, all layers, one pass

    def flops(self, p: Pass) -> int:
        n = p.prefill + p.decode
        pairs = n * (n + 1) // 2
        layers = 2 * self.layer_params * n + 4 * self.attention_width * pairs + self.recurrent * n
        return p.count * (self.loops * layers + 2 * self.head_params * p.logits)

    def axis_flops(self, axis: AxisPlan) -> int:
        return sum(self.flops(p) for p in axis.passes)


def model_cost(config, counts: dict[str, int] | None = None) -> ModelCost:
    """A QuasarLongConfig's cost terms. `counts`: quasar_model.report.parameter_counts(config), the
    count the fetch checks use (built on the meta device when not given)."""
    if counts is None:
        from quasar_model.report import parameter_counts  # here: it loads torch; competition files need this module

        counts = parameter_counts(config)
    H, d = config.num_attention_heads, config.head_dim
    # replace-mode layers (all hybrid layers in "replace", hybrid_replace_layers in "add") attend to nothing
    attention_layers = sum(1 for i in range(config.num_hidden_layers) if not config.is_replace_layer(i))
    _, Hv, dk, dv = config.quasar_heads()  # the quasar state is [Hv, dk, dv] (gated-DeltaNet form)
    per_kind = {"quasar": 6 * Hv * dk * dv, "gla": 4 * H * d * d, "raven": 8 * H * d * config.hybrid_raven_slots}
    recurrent = sum(per_kind[config.branch_kind(i)] for i in config.hybrid_attention_layers)
    recurrent += 4 * config.latent_memory_slots * config.latent_memory_dim * len(config.latent_memory_layers)
    return ModelCost(layer_params=counts["active"] - counts["embeddings"],
                     head_params=config.vocab_size * config.hidden_size, loops=config.num_loops,
                     attention_width=attention_layers * H * d, recurrent=recurrent)


def format_plan(comp: "Competition", cost: ModelCost | None = None) -> str:
    """The plan as printed by `quasar eval`: per axis sequences, tokens and (with a cost) FLOPs."""
    axes = plan(comp)
    total = sum(a.tokens for a in axes)
    lines = [f"evaluation plan ({comp.name}): per axis, the most tokens one submission's evaluation runs"]
    flops_total = 0
    for a in axes:
        line = f"  {a.axis:<14}{a.sequences:>7,} sequences {a.tokens:>14,} tokens"
        if cost is not None:
            f = cost.axis_flops(a)
            flops_total += f
            line += f"  {f:.3e} FLOPs"
        lines.append(line)
    line = f"  {'total':<14}{sum(a.sequences for a in axes):>7,} sequences {total:>14,} tokens"
    if cost is not None:
        line += f"  {flops_total:.3e} FLOPs"
    lines.append(line)
    b = comp.budget
    gpu = f" on {b.reference_gpu}" if b.reference_gpu else ""
    cap = f", at most {b.max_flops:.3e} FLOPs per student" if b.max_flops else ""
    lines.append(f"  budget: {b.tokens:,} tokens ({total / b.tokens:.0%} planned), {b.seconds:g} s per submission{gpu}{cap}")
    if cost is not None and b.max_flops:
        verdict = "within" if flops_total <= b.max_flops else "OVER (validators refuse it at fetch)"
        lines.append(f"  this student: {flops_total:.3e} FLOPs, {flops_total / b.max_flops:.0%} of budget.max_flops: {verdict}")
    if cost is not None:
        lines.append(f"  fitting {b.seconds:g} s takes {flops_total / b.seconds / 1e12:.3g} TFLOP/s sustained "
                     f"(student: {cost.layer_params:,} active layer parameters x {cost.loops} loop(s), "
                     f"attention width {cost.attention_width:,})")
    return "\n".join(lines)


__all__ = ["PROBE_LEN", "FP_POSITIONS", "CONTINUATIONS", "CONT_PROMPT", "CONT_TOKENS", "Pass", "AxisPlan", "plan",
           "planned_tokens", "ModelCost", "model_cost", "format_plan"]
