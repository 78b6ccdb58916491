"""QuasarLongConfig: every field of the architecture spec, its presets, and its validation.

The defaults are the `preview` preset (the Quasar-Preview checkpoint's exact shape), as Hugging
Face configs default to their flagship checkpoint. An invalid config fails at construction with a
message naming the field, so a hostile `config.json` is rejected before any weight is allocated.
"""
from __future__ import annotations

import math

from transformers import PreTrainedConfig

from .ops.backend import KERNEL_BACKENDS

BRANCH_KINDS = ("quasar", "raven", "gla")
LONG_CONTEXT_MODES = ("rope_short_nope_long", "rope", "nope")
BALANCING_METHODS = ("smebu", "sign", "none")
ROUTER_SCORES = ("sigmoid", "softmax")
REPLACEMENT_MODES = ("add", "replace")  # "replace": the branch alone (see layers/hybrid.py)
QUASAR_STEPS = ("sigmoid", "softplus")  # the continuous-time beta's parameterisation (layers/quasar.py)
QUASAR_OUTPUT_GATES = ("low_rank", "silu_z")
RAVEN_DECAY_TYPES = ("Mamba2",)


class QuasarLongConfig(PreTrainedConfig):
    model_type = "quasar_long"
    keys_to_ignore_at_inference = ["cache"]

    # --- trunk ---
    vocab_size: int = 157184
    hidden_size: int = 2048
    num_hidden_layers: int = 20
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    head_dim: int = 128
    intermediate_size: int = 5120
    rms_norm_eps: float = 1e-6
    use_qk_norm: bool = True
    # (1 + w) scales on the trunk and attention q/k norms, w from 0 (Qwen3.5's RMSNorm); off: w from 1
    zero_centered_rms_norm: bool = False
    # attention output gate: o *= sigmoid(W_g x) per channel before o_proj, W_g's rows appended to
    # qkv_proj as [q; k; v; gate] (Qwen3.5's full-attention layers); off in every preset
    attention_output_gate: bool = False
    # biases on q, k and v (not o) in qkv_proj: GLM-4's attention; off in every preset
    attention_qkv_bias: bool = False
    # RMSNorms on the mixer's and the FFN's outputs before each residual add (GLM-4's
    # post_self_attn / post_mlp norms, a "sandwich"); off in every preset
    sandwich_norm: bool = False
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    use_cache: bool = True
    # --- positions: RoPE on the first partial_rotary_factor*head_dim dims, identity past the cutoff ---
    partial_rotary_factor: float = 0.5
    rope_theta: float = 10000.0
    use_nope: bool = True
    long_context_mode: str = "rope_short_nope_long"
    nope_after_position: int = 512
    max_position_embeddings: int = 5_000_000
    # --- MoE (layers >= first_k_dense_replace) ---
    first_k_dense_replace: int = 1
    num_experts: int = 256
    num_experts_per_tok: int = 8
    num_shared_experts: int = 1
    moe_intermediate_size: int = 512
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5  # (choice; 1.0 is the other value seen)
    moe_balancing: str = "smebu"
    # Router and shared expert variants (the defaults are the spec's router): expert scores by
    # "sigmoid" or "softmax" (over all experts, Qwen3.5-MoE's router); the picked weights renormalised
    # to sum to one or not; the shared expert's width (None: num_shared_experts * moe_intermediate_size)
    # and a per-token sigmoid gate on its output (Qwen3.5-MoE's shared_expert_gate)
    moe_router_score: str = "sigmoid"
    moe_norm_topk_prob: bool = True
    moe_shared_expert_intermediate_size: int | None = None
    moe_shared_expert_gate: bool = False
    smebu_kappa: float = 2.0
    smebu_lambda: float = 2e-3
    smebu_beta: float = 0.5
    sign_gamma: float = 1e-3
    # --- hybrid layers: GQA + sigmoid(a) * Adapter(c * g * Branch(x)) ---
    hybrid_attention_layers: list[int] | None = None
    hybrid_branch_layout: str = "layerwise"
    hybrid_layerwise_cycle: list[str] | None = None
    hybrid_replacement_mode: str = "add"
    # hybrid layers that are the branch alone even in "add" mode (a teacher's own recurrent layers,
    # e.g. Qwen3.5's gated DeltaNet layers, which have no attention to keep beside them)
    hybrid_replace_layers: list[int] | None = None
    hybrid_alpha_init: float = -15.0
    hybrid_output_adapter_rank: int = 16
    hybrid_quasar_gate_rank: int = 128
    hybrid_quasar_use_decay: bool = False  # (choice) optional exp(psi) state decay, off
    # The quasar branch in gated-DeltaNet form (Qwen3.5's linear-attention layers); the defaults are
    # the spec's branch. Head counts/dims: None = num_attention_heads / head_dim; value heads are a
    # multiple of key heads (each q/k head serves that many consecutive value heads).
    hybrid_quasar_num_key_heads: int | None = None
    hybrid_quasar_num_value_heads: int | None = None  # None: as many as key heads
    hybrid_quasar_key_head_dim: int | None = None
    hybrid_quasar_value_head_dim: int | None = None  # None: the key head dim
    hybrid_quasar_conv_kernel: int = 0  # causal depthwise conv on q/k/v before the SiLU (taps); 0: none
    hybrid_quasar_input_norm: bool = True  # the weightless RMSNorm of the branch input
    hybrid_quasar_l2norm_eps: float = 0.0  # 0: F.normalize; > 0: x * rsqrt(|x|^2 + eps), fla's l2norm
    hybrid_quasar_step: str = "sigmoid"  # beta = sigmoid(W x) | "softplus" (see layers/quasar.py)
    hybrid_quasar_output_gate: str = "low_rank"  # sigmoid(G(x)) | "silu_z": SiLU(W_z x)
    hybrid_raven_slots: int = 64
    hybrid_raven_topk: int = 32
    hybrid_raven_decay_type: str = "Mamba2"
    hybrid_gla_data_dependent_gate: bool = False  # Quasar-10B style gate, off in preview
    hybrid_gla_nope: bool = False  # GLA branches read no rotary embedding (Quasar-10B's GLA + NoPE)
    kernel_backend: str = "auto"
    # --- loop transformer ---
    num_loops: int = 1
    use_looped_injection: bool = False
    loop_injection_init: float = -6.907  # sigmoid(-6.907) ~ 0.001
    # --- engram (conditional n-gram memory) ---
    engram_layers: list[int] | None = None
    engram_dim: int = 512
    engram_slots: int = 2_000_000
    engram_ngram_orders: list[int] | None = None
    engram_num_heads: int = 8
    engram_residual_scale: float = 0.01
    engram_lr_multiplier: float = 5.0
    engram_conv_kernel: int = 4
    # --- persistent latent memory (Quasar 3B; optional, off in every preset) ---
    latent_memory_layers: list[int] | None = None
    latent_memory_slots: int = 128
    latent_memory_dim: int = 256
    latent_memory_segment: int = 64
    latent_memory_decay: float = 0.9
    # --- special tokens ---
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        if self.hybrid_attention_layers is None:
            self.hybrid_attention_layers = list(range(4, 20))
        if self.hybrid_layerwise_cycle is None:
            self.hybrid_layerwise_cycle = ["quasar", "raven", "quasar", "quasar", "gla"]
        if self.engram_layers is None:
            self.engram_layers = []
        if self.engram_ngram_orders is None:
            self.engram_ngram_orders = [2, 3]
        if self.latent_memory_layers is None:
            self.latent_memory_layers = []
        if self.hybrid_replace_layers is None:
            self.hybrid_replace_layers = []
        self.hybrid_replace_layers = [int(i) for i in self.hybrid_replace_layers]
        self.hybrid_attention_layers = [int(i) for i in self.hybrid_attention_layers]
        self.engram_layers = [int(i) for i in self.engram_layers]
        self.latent_memory_layers = [int(i) for i in self.latent_memory_layers]
        super().__post_init__(**kwargs)
        self.check()

    # ------------------------------------------------------------------ derived shape
    def branch_kind(self, layer_idx: int) -> str | None:
        """The branch of a hybrid layer: the cycle indexed by the position inside the hybrid list."""
        if layer_idx not in self.hybrid_attention_layers:
            return None
        pos = self.hybrid_attention_layers.index(layer_idx)
        return self.hybrid_layerwise_cycle[pos % len(self.hybrid_layerwise_cycle)]

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace and self.num_experts > 0

    def is_replace_layer(self, layer_idx: int) -> bool:
        """A hybrid layer that is its branch alone (no attention beside it)."""
        return self.branch_kind(layer_idx) is not None and (
            self.hybrid_replacement_mode == "replace" or layer_idx in self.hybrid_replace_layers)

    def shared_expert_width(self) -> int:
        """The shared expert's intermediate width (0: no shared expert)."""
        if self.num_shared_experts < 1:
            return 0
        return self.moe_shared_expert_intermediate_size or self.num_shared_experts * self.moe_intermediate_size

    def quasar_heads(self) -> tuple[int, int, int, int]:
        """(key heads, value heads, key head dim, value head dim) of the quasar branch."""
        hk = self.hybrid_quasar_num_key_heads or self.num_attention_heads
        dk = self.hybrid_quasar_key_head_dim or self.head_dim
        return hk, self.hybrid_quasar_num_value_heads or hk, dk, self.hybrid_quasar_value_head_dim or dk

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    # ------------------------------------------------------------------ validation
    def check(self) -> None:
        def fail(field: str, why: str):
            raise ValueError(f"QuasarLongConfig.{field}: {why} (got {getattr(self, field)!r})")

        def layers_exist(field: str):
            for i in getattr(self, field):
                if not 0 <= i < self.num_hidden_layers:
                    fail(field, f"layer {i} out of range [0, {self.num_hidden_layers})")

        # The bounds below exist so that a hostile config is refused before allocation.
        for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "head_dim", "intermediate_size", "num_loops",
                      "max_position_embeddings"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(field, "must be a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            fail("num_key_value_heads", f"must divide num_attention_heads={self.num_attention_heads}")
        if not 0.0 <= self.partial_rotary_factor <= 1.0:
            fail("partial_rotary_factor", "must be in [0, 1]")
        exact = self.head_dim * self.partial_rotary_factor
        if abs(exact - round(exact)) > 1e-6 or round(exact) % 2:
            fail("partial_rotary_factor", f"partial_rotary_factor*head_dim={exact:g} must be an even integer")
        if self.long_context_mode not in LONG_CONTEXT_MODES:
            fail("long_context_mode", f"must be one of {LONG_CONTEXT_MODES}")
        if self.nope_after_position < 0:
            fail("nope_after_position", "must be >= 0")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            fail("first_k_dense_replace", f"must be in [0, num_hidden_layers={self.num_hidden_layers}]")
        if self.num_experts < 0:
            fail("num_experts", "must be >= 0 (0 = dense FFN everywhere)")
        if self.num_experts > 0 and self.first_k_dense_replace < self.num_hidden_layers:
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                fail("num_experts_per_tok", f"must be in [1, num_experts={self.num_experts}]")
            if self.n_group < 1 or self.num_experts % self.n_group:
                fail("n_group", f"must divide num_experts={self.num_experts}")
            if not 1 <= self.topk_group <= self.n_group:
                fail("topk_group", f"must be in [1, n_group={self.n_group}]")
            reachable = self.topk_group * (self.num_experts // self.n_group)
            if self.num_experts_per_tok > reachable:
                fail("num_experts_per_tok", f"larger than the {reachable} experts of the kept groups")
            if self.moe_intermediate_size < 1:
                fail("moe_intermediate_size", "must be a positive integer")
            if self.num_shared_experts < 0:
                fail("num_shared_experts", "must be >= 0")
            width = self.moe_shared_expert_intermediate_size
            if width is not None:
                if not isinstance(width, int) or isinstance(width, bool) or width < 1:
                    fail("moe_shared_expert_intermediate_size", "must be a positive integer or None")
                if self.num_shared_experts < 1:
                    fail("moe_shared_expert_intermediate_size", "sets the shared expert's width: needs "
                         "num_shared_experts >= 1")
            if self.moe_shared_expert_gate and self.num_shared_experts < 1:
                fail("moe_shared_expert_gate", "gates the shared expert: needs num_shared_experts >= 1")
        if self.moe_router_score not in ROUTER_SCORES:
            fail("moe_router_score", f"must be one of {ROUTER_SCORES}")
        if self.moe_balancing not in BALANCING_METHODS:
            fail("moe_balancing", f"must be one of {BALANCING_METHODS}")
        if len(set(self.hybrid_attention_layers)) != len(self.hybrid_attention_layers):
            fail("hybrid_attention_layers", "has repeated layers")
        layers_exist("hybrid_attention_layers")
        if self.hybrid_attention_layers and not self.hybrid_layerwise_cycle:
            fail("hybrid_layerwise_cycle", "must name at least one branch")
        for name in self.hybrid_layerwise_cycle:
            if name not in BRANCH_KINDS:
                fail("hybrid_layerwise_cycle", f"unknown branch {name!r}; known: {BRANCH_KINDS}")
        if self.hybrid_branch_layout != "layerwise":
            fail("hybrid_branch_layout", "only 'layerwise' is defined")
        if self.hybrid_replacement_mode not in REPLACEMENT_MODES:
            fail("hybrid_replacement_mode", f"must be one of {REPLACEMENT_MODES}")
        if self.hybrid_raven_decay_type not in RAVEN_DECAY_TYPES:
            fail("hybrid_raven_decay_type", f"must be one of {RAVEN_DECAY_TYPES}")
        if "raven" in self.hybrid_layerwise_cycle and not 1 <= self.hybrid_raven_topk <= self.hybrid_raven_slots:
            fail("hybrid_raven_topk", f"must be in [1, hybrid_raven_slots={self.hybrid_raven_slots}]")
        for i in self.hybrid_replace_layers:
            if i not in self.hybrid_attention_layers:
                fail("hybrid_replace_layers", f"layer {i} is not in hybrid_attention_layers")
        for field in ("hybrid_quasar_num_key_heads", "hybrid_quasar_num_value_heads",
                      "hybrid_quasar_key_head_dim", "hybrid_quasar_value_head_dim"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                fail(field, "must be a positive integer or None")
        hk, hv, _, _ = self.quasar_heads()
        if hv % hk:
            fail("hybrid_quasar_num_value_heads", f"must be a multiple of the key heads ({hk})")
        if not isinstance(self.hybrid_quasar_conv_kernel, int) or not 0 <= self.hybrid_quasar_conv_kernel <= 64:
            fail("hybrid_quasar_conv_kernel", "must be an integer in [0, 64] (0: no convolution)")
        if not 0.0 <= self.hybrid_quasar_l2norm_eps < 1.0:
            fail("hybrid_quasar_l2norm_eps", "must be in [0, 1)")
        if self.hybrid_quasar_step not in QUASAR_STEPS:
            fail("hybrid_quasar_step", f"must be one of {QUASAR_STEPS}")
        if self.hybrid_quasar_output_gate not in QUASAR_OUTPUT_GATES:
            fail("hybrid_quasar_output_gate", f"must be one of {QUASAR_OUTPUT_GATES}")
        if self.hybrid_output_adapter_rank < 0:
            fail("hybrid_output_adapter_rank", "must be >= 0")
        if self.hybrid_quasar_gate_rank < 1:
            fail("hybrid_quasar_gate_rank", "must be a positive integer")
        if self.kernel_backend not in KERNEL_BACKENDS:
            fail("kernel_backend", f"must be one of {KERNEL_BACKENDS}")
        if not math.isfinite(self.hybrid_alpha_init):
            fail("hybrid_alpha_init", "must be finite")
        layers_exist("engram_layers")
        if self.engram_layers:
            if self.engram_num_heads < 1 or self.engram_dim % self.engram_num_heads:
                fail("engram_num_heads", f"must divide engram_dim={self.engram_dim}")
            if not self.engram_ngram_orders or any(n < 2 for n in self.engram_ngram_orders):
                fail("engram_ngram_orders", "orders must be >= 2")
            if self.engram_slots < 2:
                fail("engram_slots", "must be >= 2")
        layers_exist("latent_memory_layers")
        if self.latent_memory_layers and (self.latent_memory_slots < 1 or self.latent_memory_segment < 1):
            fail("latent_memory_slots", "slots and segment must be positive")

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides) -> "QuasarLongConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict] = {
    # Quasar-Preview's exact shape (the class defaults).
    "preview": {},
    # Every component on, small enough for a sub-second CPU forward: the test model.
    "tiny": dict(
        vocab_size=384, hidden_size=64, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=128, first_k_dense_replace=1,
        num_experts=8, num_experts_per_tok=2, num_shared_experts=1, moe_intermediate_size=32,
        n_group=4, topk_group=2, nope_after_position=16, max_position_embeddings=65536,
        hybrid_attention_layers=[1, 2, 3, 4, 5], hybrid_alpha_init=0.0,  # branches audible in tests
        hybrid_output_adapter_rank=4, hybrid_quasar_gate_rank=16, hybrid_raven_slots=8,
        hybrid_raven_topk=4, num_loops=2, use_looped_injection=True, engram_layers=[2],
        engram_dim=32, engram_slots=1031, engram_num_heads=2,
    ),
    # A single-GPU miner's student: Qwen-family vocab, ~200 M total parameters.
    "small": dict(
        vocab_size=151936, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=2, head_dim=64, intermediate_size=1536, first_k_dense_replace=1,
        num_experts=8, num_experts_per_tok=2, num_shared_experts=1, moe_intermediate_size=256,
        n_group=4, topk_group=2, nope_after_position=4096, max_position_embeddings=1_048_576,
        hybrid_attention_layers=[2, 3, 4, 5, 6, 7], hybrid_output_adapter_rank=16,
        hybrid_quasar_gate_rank=64, hybrid_raven_slots=32, hybrid_raven_topk=16,
    ),
    # The plain-transformer baseline (QED-75M style): RoPE, RMSNorm, SwiGLU; no branches, no MoE.
    "dense": dict(
        vocab_size=151936, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=2, head_dim=64, intermediate_size=1536, first_k_dense_replace=8,
        num_experts=0, use_nope=False, long_context_mode="rope", partial_rotary_factor=1.0,
        max_position_embeddings=1_048_576, hybrid_attention_layers=[],
    ),
}
