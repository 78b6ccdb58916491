"""Quasar-Long: a hybrid MoE decoder with recurrent branches, looped execution and n-gram memory.

    ids -> embed (= P) -> [loop 1..num_loops] x [layer 0..L-1] -> RMSNorm -> LM head
    layer:  h += sigmoid(gamma_l) P              (loop injection, when on)
            h += engram(h)                        (engram layers)
            h += Mixer(RMSNorm(h))                (GQA, or GQA + gated branch on hybrid layers)
            h += FFN(RMSNorm(h))                  (dense SwiGLU first, MoE after)
    (sandwich_norm: each sublayer's output passes one more RMSNorm before its add, as in GLM-4)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg

from .cache import QuasarLongCache
from .configuration_quasar_long import QuasarLongConfig
from .layers.attention import GQAttention
from .layers.engram import Engram
from .layers.hybrid import HybridMixer
from .layers.latent_memory import LatentMemory
from .layers.loading import load_
from .layers.mlp import SwiGLU
from .layers.moe import MoE
from .layers.norm import RMSNorm
from .layers.packing import cu_seqlens_from_position_ids, document_ids
from .layers.rotary import RotaryEmbedding


@dataclass
class StepContext:
    """What every layer of one forward shares: positions, masks, and the token ids engram hashes."""
    rope: tuple[torch.Tensor, torch.Tensor] | None
    attn_mask: torch.Tensor | None  # [B, 1, T, S] bool, None = plain causal
    token_mask: torch.Tensor | None  # [B, T] bool, None = no padding
    cu_seqlens: torch.Tensor | None  # packed documents over the flattened batch
    position_ids: torch.Tensor
    input_ids: torch.Tensor | None
    prev_ids: torch.Tensor | None


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity forward, gradient times `scale` backward."""
    return x * scale + x.detach() * (1.0 - scale)


class QuasarLongDecoderLayer(nn.Module):
    def __init__(self, config: QuasarLongConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        zc = config.zero_centered_rms_norm
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, zero_centered=zc)
        self.post_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, zero_centered=zc)
        self.is_hybrid = config.branch_kind(layer_idx) is not None
        self.mixer = HybridMixer(config, layer_idx) if self.is_hybrid else GQAttention(config)
        if config.is_moe_layer(layer_idx):
            self.ffn = MoE(
                config.hidden_size, config.moe_intermediate_size, config.num_experts, config.num_experts_per_tok,
                config.num_shared_experts, config.n_group, config.topk_group, config.routed_scaling_factor,
                balancing=config.moe_balancing, smebu_kappa=config.smebu_kappa, smebu_lambda=config.smebu_lambda,
                smebu_beta=config.smebu_beta, sign_gamma=config.sign_gamma, score=config.moe_router_score,
                norm_topk_prob=config.moe_norm_topk_prob,
                shared_intermediate_size=config.moe_shared_expert_intermediate_size,
                shared_gate=config.moe_shared_expert_gate,
            )
        else:
            self.ffn = SwiGLU(config.hidden_size, config.intermediate_size)
        # sandwich: the sublayers' outputs normalised before each residual add (GLM-4)
        sandwich = (lambda: RMSNorm(config.hidden_size, config.rms_norm_eps, zero_centered=zc)) if config.sandwich_norm else None
        self.mixer_out_norm = sandwich() if sandwich else None
        self.ffn_out_norm = sandwich() if sandwich else None
        self.engram = Engram(config, layer_idx) if layer_idx in config.engram_layers else None
        self.memory = LatentMemory(config) if layer_idx in config.latent_memory_layers else None

    # Loading weights given from outside (quasar_model/conversion: a teacher's), in plain nn.Linear
    # terms; each sublayer lays them into its own parameters.
    @torch.no_grad()
    def load_norms(self, input_norm, post_norm, mixer_out=None, ffn_out=None, *, zero_centered=False) -> None:
        """The norms before the mixer and the FFN, and with sandwich_norm those of their outputs;
        zero_centered: the given weights scale by (1 + w)."""
        for norm, w, name in ((self.input_norm, input_norm, "input_norm"), (self.post_norm, post_norm, "post_norm"),
                              (self.mixer_out_norm, mixer_out, "mixer_out_norm"),
                              (self.ffn_out_norm, ffn_out, "ffn_out_norm")):
            if (norm is None) != (w is None):
                raise ValueError(f"layers.{self.layer_idx}.{name}: the student has {'none' if norm is None else 'one'}, "
                                 f"the teacher {'none' if w is None else 'one'} (sandwich_norm)")
            if norm is not None:
                norm.load_scale(w, zero_centered=zero_centered, name=f"layers.{self.layer_idx}.{name}")

    def load_attention(self, weights: dict, *, into_branch: bool = True) -> None:
        """An attention (GQAttention.load_weights' arguments): the layer's own, or on a hybrid layer the
        attention beside the branch and, with into_branch, the branch's start."""
        if self.is_hybrid:
            self.mixer.load_from_attention(weights, into_branch=into_branch)
        else:
            self.mixer.load_weights(**weights)

    def load_gated_deltanet(self, weights: dict) -> None:
        """A gated DeltaNet layer (QuasarBranch.load_gated_deltanet's arguments): a replace-mode quasar layer."""
        if not (self.is_hybrid and self.mixer.replace and self.mixer.kind == "quasar"):
            raise ValueError(f"layer {self.layer_idx}: the teacher's gated DeltaNet maps onto a replace-mode quasar "
                             "layer only (hybrid_replace_layers, cycle 'quasar')")
        self.mixer.branch.load_gated_deltanet(**weights)

    def load_dense_ffn(self, gate, up, down) -> None:
        """A dense SwiGLU: this layer's, or on a MoE layer the shared expert the routed ones upcycle from."""
        name = f"layers.{self.layer_idx}.ffn"
        (self.ffn.upcycle if isinstance(self.ffn, MoE) else self.ffn.load_weights)(gate, up, down, name=name)

    def load_moe_ffn(self, weights: dict) -> None:
        """A MoE (MoE.load_weights' arguments)."""
        if not isinstance(self.ffn, MoE):
            raise ValueError(f"layer {self.layer_idx}: the teacher's layer is MoE, the student's is dense "
                             "(first_k_dense_replace differs)")
        self.ffn.load_weights(**weights, name=f"layers.{self.layer_idx}.ffn")

    def forward(self, h: torch.Tensor, ctx: StepContext, state: dict | None) -> torch.Tensor:
        if self.engram is not None:
            sub = None if state is None else state.setdefault("engram", {})
            h = h + self.engram(h, ctx.input_ids, ctx.prev_ids, ctx.position_ids, sub)
        x = self.input_norm(h)
        if self.is_hybrid:
            m = self.mixer(x, ctx.rope, ctx.attn_mask, state, ctx.token_mask, ctx.cu_seqlens)
        else:
            m = self.mixer(x, ctx.rope, ctx.attn_mask, state)
        if self.memory is not None:
            m = m + self.memory(x, None if state is None else state.setdefault("memory", {}))
        if self.mixer_out_norm is not None:
            m = self.mixer_out_norm(m)
        h = h + m
        x = self.post_norm(h)
        f = self.ffn(x, token_mask=ctx.token_mask) if isinstance(self.ffn, MoE) else self.ffn(x)
        if self.ffn_out_norm is not None:
            f = self.ffn_out_norm(f)
        return h + f


class QuasarLongPreTrainedModel(PreTrainedModel):
    config_class = QuasarLongConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["QuasarLongDecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        # Children are initialised before their parents, so a module's own reset_parameters
        # (zero adapters, gate biases, Mamba2 decays, ...) has the last word over the generic init.
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, MoE):
            module.reset_parameters(std)
            for buf in module.buffers(recurse=False):  # balancing state starts at zero unless loaded
                init.zeros_(buf)
        elif hasattr(module, "reset_parameters") and module.__module__.startswith("quasar_model."):
            module.reset_parameters()
        if isinstance(module, QuasarLongModel) and module.loop_gates is not None:
            init.constant_(module.loop_gates, self.config.loop_injection_init)


class QuasarLongModel(QuasarLongPreTrainedModel):
    def __init__(self, config: QuasarLongConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(QuasarLongDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, zero_centered=config.zero_centered_rms_norm)
        self.rotary = RotaryEmbedding(
            config.rotary_dim, config.rope_theta, config.long_context_mode, config.use_nope, config.nope_after_position
        )
        self.loop_gates = (
            nn.Parameter(torch.full((config.num_hidden_layers,), config.loop_injection_init))
            if config.use_looped_injection else None
        )
        self.engram_lag = max(config.engram_ngram_orders) - 1 if config.engram_layers else 0
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _context(self, input_ids, attention_mask, position_ids, past, B, T, device, cache):
        key_valid = None
        if attention_mask is not None:
            if attention_mask.shape != (B, past + T):
                raise ValueError(f"attention_mask must be [batch, past+new] = {(B, past + T)}, got {tuple(attention_mask.shape)}")
            if not bool(attention_mask.all()):
                key_valid = attention_mask.bool()
        token_mask = None if key_valid is None else key_valid[:, -T:]
        # Packed documents: explicit position ids that reset, on a fresh unpadded sequence.
        packed = position_ids is not None and past == 0 and key_valid is None
        if position_ids is None:
            if key_valid is not None:
                position_ids = (key_valid.long().cumsum(-1) - 1).clamp_min(0)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=device).expand(B, T)
        cu_seqlens = cu_seqlens_from_position_ids(position_ids) if packed else None
        if cu_seqlens is not None and cache is not None:
            raise ValueError("packed sequences (position ids that reset) cannot be used with a cache")
        attn_mask = None
        if key_valid is not None or cu_seqlens is not None or (past > 0 and T > 1):
            q_pos = torch.arange(past, past + T, device=device)
            k_pos = torch.arange(past + T, device=device)
            attn_mask = (k_pos[None, :] <= q_pos[:, None]).expand(B, T, past + T)
            if key_valid is not None:
                attn_mask = attn_mask & key_valid[:, None, :]
            if cu_seqlens is not None:
                doc = document_ids(position_ids)
                attn_mask = attn_mask & (doc[:, :, None] == doc[:, None, :])
            # a padded query that sees no key would make SDPA return NaN: let it see itself
            attn_mask = (attn_mask | (k_pos[None, :] == q_pos[:, None]))[:, None]
        rope = self.rotary(position_ids) if self.rotary.enabled else None
        prev_ids = cache.token_history if cache is not None else None
        return StepContext(rope, attn_mask, token_mask, cu_seqlens, position_ids, input_ids, prev_ids)

    # transformers 5.24 renamed past_key_values to cache; old callers keep working, with its warning
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, use_cache=None, output_hidden_states=None, **kwargs) -> BaseModelOutputWithPast:
        # output_hidden_states: Hugging Face's convention, (embeddings, output of layer 0, ..., of layer
        # L-2, normed output of layer L-1), the layer outputs taken from the last loop
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if input_ids is None and self.engram_lag:
            raise ValueError("engram layers hash token ids: pass input_ids, not inputs_embeds")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [B, T, hidden]
        B, T, _ = h.shape
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if cache is None and use_cache:
            cache = QuasarLongCache()
        if cache is not None and not isinstance(cache, QuasarLongCache):
            raise TypeError(f"cache must be a QuasarLongCache, got {type(cache).__name__}")
        past = cache.get_seq_length() if cache is not None else 0
        ctx = self._context(input_ids, attention_mask, position_ids, past, B, T, h.device, cache)

        P = h
        n_loops = self.config.num_loops
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        hidden_states = [h] if output_hidden_states else None
        for loop in range(n_loops):
            for i, layer in enumerate(self.layers):
                if self.loop_gates is not None:
                    h = h + torch.sigmoid(scale_grad(self.loop_gates[i], 1.0 / n_loops)).to(h.dtype) * P
                state = cache.entry(loop, i) if cache is not None else None
                if self.gradient_checkpointing and self.training and state is None:
                    h = checkpoint(layer, h, ctx, None, use_reentrant=False)
                else:
                    h = layer(h, ctx, state)
                if hidden_states is not None and loop == n_loops - 1 and i < len(self.layers) - 1:
                    hidden_states.append(h)
        h = self.norm(h)
        if hidden_states is not None:
            hidden_states.append(h)

        if cache is not None:
            cache.seen_tokens += T
            if self.engram_lag:
                hist = input_ids if ctx.prev_ids is None else torch.cat([ctx.prev_ids, input_ids], 1)
                cache.token_history = hist[:, -self.engram_lag:]
        return BaseModelOutputWithPast(last_hidden_state=h, cache=cache,
                                       hidden_states=None if hidden_states is None else tuple(hidden_states))

    def moe_layers(self) -> list[MoE]:
        return [layer.ffn for layer in self.layers if isinstance(layer.ffn, MoE)]


# The parts a parameter count reports, in report order.
PARAMETER_GROUPS = ("embeddings", "attention", "branches", "ffn_dense", "experts_routed", "experts_shared",
                    "engram", "latent_memory", "other")


def _layer_groups(layer: QuasarLongDecoderLayer) -> list[tuple[str, list[nn.Parameter]]]:
    """A layer's parameters by part; a parameter not named here (norms, the MoE router) is "other"."""
    parts = []
    if isinstance(layer.mixer, HybridMixer):
        parts.append(("branches", [p for _, p in layer.mixer.branch_parameters()]))
    parts.append(("attention", list(layer.mixer.parameters())))  # whatever the branches left: GQA
    if isinstance(layer.ffn, MoE):
        parts.append(("experts_routed", [layer.ffn.gate_up_proj, layer.ffn.down_proj]))
        for shared in (layer.ffn.shared_experts, layer.ffn.shared_expert_gate):
            if shared is not None:
                parts.append(("experts_shared", list(shared.parameters())))
    else:
        parts.append(("ffn_dense", list(layer.ffn.parameters())))
    for group, module in (("engram", layer.engram), ("latent_memory", layer.memory)):
        if module is not None:
            parts.append((group, list(module.parameters())))
    return parts


class QuasarLongForCausalLM(QuasarLongPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: QuasarLongConfig):
        super().__init__(config)
        self.model = QuasarLongModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Every named parameter under exactly one of PARAMETER_GROUPS, decided by the module that
        owns it (not by its name), so the trainer's frozen set and the report's counts agree."""
        owner = {}
        claims = [("embeddings", [*self.model.embed_tokens.parameters(), *self.lm_head.parameters()])]
        for layer in self.model.layers:
            claims += _layer_groups(layer)
        for group, params in claims:
            for p in params:
                owner.setdefault(id(p), group)  # first claim wins: branches before the mixer's rest
        groups = {g: [] for g in PARAMETER_GROUPS}
        for name, p in self.named_parameters():
            groups[owner.get(id(p), "other")].append((name, p))
        return groups

    def branch_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The hybrid layers' branches and the gates on their output (HybridMixer.branch_parameters)."""
        return self.parameter_groups()["branches"]

    def set_output_embeddings(self, value):
        self.lm_head = value

    @torch.no_grad()
    def load_outer_weights(self, embed_tokens, norm, lm_head=None, *, norm_zero_centered=False) -> None:
        """What lies outside the layers: token embeddings, final norm, and the LM head (None, and
        ignored, when tie_word_embeddings makes the embeddings the head)."""
        load_(self.model.embed_tokens.weight, embed_tokens, "embed_tokens")
        self.model.norm.load_scale(norm, zero_centered=norm_zero_centered, name="norm")
        if self.config.tie_word_embeddings:
            self.tie_weights()
        else:
            load_(self.lm_head.weight, lm_head, "lm_head")

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep: int = 0,
                output_hidden_states=None, **kwargs) -> CausalLMOutputWithPast:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         output_hidden_states=output_hidden_states)
        h = out.last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            # next-token cross-entropy; -100 marks positions that are not predicted
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache,
                                      hidden_states=out.hidden_states)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        # Hugging Face would build a DynamicCache (K/V only); the branches need their recurrent states.
        if model_kwargs.get("cache") is None and generation_config.use_cache is not False:
            model_kwargs["cache"] = QuasarLongCache()
