"""The Quasar-Long model: decode parity, gradients, padding, packing, save/load, generate, presets."""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from quasar_model import QuasarLongCache, QuasarLongConfig, QuasarLongForCausalLM
from quasar_model.layers.moe import MoE
from quasar_model.report import parameter_counts


def tiny(**overrides):
    # a wider init than training's 0.02 makes every component's contribution large enough to test
    return QuasarLongConfig.preset("tiny", initializer_range=0.08, **overrides)


def make(cfg, seed=0):
    torch.manual_seed(seed)
    return QuasarLongForCausalLM(cfg).eval()


def decode_token_by_token(model, ids):
    cache, logits = QuasarLongCache(), []
    for t in range(ids.shape[1]):
        logits.append(model(ids[:, t:t + 1], cache=cache, use_cache=True).logits)
    return torch.cat(logits, 1)


@pytest.mark.parametrize("overrides", [
    {},  # loops=2 with injection, engram on layer 2, all three branches
    dict(num_loops=1, use_looped_injection=False),
    dict(latent_memory_layers=[3], latent_memory_segment=8, latent_memory_slots=6, latent_memory_dim=16),
    dict(hybrid_gla_data_dependent_gate=True, engram_layers=[1, 5]),
    dict(hybrid_replacement_mode="replace"),  # hybrid layers without attention: recurrent state only
])
def test_full_forward_equals_token_by_token_decoding(overrides):
    cfg = tiny(**overrides)
    model = make(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 45))  # crosses nope_after_position=16
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        step = decode_token_by_token(model, ids)
    assert full.abs().max() > 0.5  # the comparison is not between near-zero numbers
    assert (full - step).abs().max().item() <= 1e-4


def test_chunked_prefill_equals_full_forward():
    cfg = tiny(latent_memory_layers=[4], latent_memory_segment=8, latent_memory_slots=4, latent_memory_dim=16)
    model = make(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 50))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = QuasarLongCache()
        parts = [model(ids[:, a:b], cache=cache).logits for a, b in [(0, 13), (13, 14), (14, 37), (37, 50)]]
    assert (torch.cat(parts, 1) - full).abs().max().item() <= 1e-4


def test_nope_cutoff_changes_positions_only_past_it():
    cfg = tiny()
    a, b = make(cfg), make(QuasarLongConfig.preset("tiny", initializer_range=0.08, use_nope=False, long_context_mode="rope"))
    ids = torch.randint(0, cfg.vocab_size, (1, 40))
    with torch.no_grad():
        la, lb = a(ids, use_cache=False).logits, b(ids, use_cache=False).logits
    cut = cfg.nope_after_position
    assert torch.allclose(la[:, :cut], lb[:, :cut], atol=1e-5)  # same weights, same RoPE below the cutoff
    assert not torch.allclose(la[:, cut:], lb[:, cut:], atol=1e-3)


def test_gradients_reach_every_trainable_parameter():
    cfg = tiny(latent_memory_layers=[3], latent_memory_segment=8, latent_memory_slots=6, latent_memory_dim=16)
    model = make(cfg).train()
    with torch.no_grad():  # zero-initialised adapters block their down-projections' gradient at step 0
        for layer in model.model.layers:
            if layer.is_hybrid:
                layer.mixer.adapter_up.weight.normal_(std=0.05)
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    model(ids, labels=ids).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert missing == []


def test_moe_bias_is_a_buffer_and_loop_gate_gradient_is_scaled():
    cfg = tiny()
    model = make(cfg).train()
    moe = model.model.moe_layers()[0]
    assert isinstance(moe, MoE)
    names = dict(model.named_parameters())
    assert not any("expert_bias" in n for n in names)
    assert any(n.endswith("expert_bias") for n, _ in model.named_buffers())
    assert any(k.endswith("expert_bias") for k in model.state_dict())
    # the loop gate's gradient is 1/num_loops of what the unscaled graph would give
    ids = torch.randint(0, cfg.vocab_size, (1, 20))
    model(ids, labels=ids).loss.backward()
    g_scaled = model.model.loop_gates.grad.clone()
    import quasar_model.modeling_quasar_long as m
    orig = m.scale_grad
    m.scale_grad = lambda x, s: x
    try:
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
    finally:
        m.scale_grad = orig
    assert torch.allclose(g_scaled, model.model.loop_gates.grad / cfg.num_loops, rtol=1e-4, atol=1e-10)


def test_left_padding_matches_unpadded_sequences():
    cfg = tiny()
    model = make(cfg)
    long_ids = torch.randint(1, cfg.vocab_size, (1, 30))
    short_ids = torch.randint(1, cfg.vocab_size, (1, 21))
    pad = torch.zeros(1, 9, dtype=torch.long)
    batch = torch.cat([long_ids, torch.cat([pad, short_ids], 1)])
    mask = torch.ones_like(batch)
    mask[1, :9] = 0
    with torch.no_grad():
        out = model(batch, attention_mask=mask, use_cache=False).logits
        ref_long = model(long_ids, use_cache=False).logits
        ref_short = model(short_ids, use_cache=False).logits
    assert (out[0] - ref_long[0]).abs().max() <= 1e-4
    assert (out[1, 9:] - ref_short[0]).abs().max() <= 1e-4


def test_packed_documents_equal_separate_forwards():
    cfg = tiny()
    model = make(cfg)
    docs = [torch.randint(0, cfg.vocab_size, (n,)) for n in (11, 20, 9)]
    ids = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        packed = model(ids, position_ids=pos, use_cache=False).logits[0]
        separate = torch.cat([model(d[None], use_cache=False).logits[0] for d in docs])
    assert (packed - separate).abs().max() <= 1e-4


def test_labels_give_shifted_cross_entropy():
    cfg = tiny()
    model = make(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 17))
    labels = ids.clone()
    labels[0, 5] = -100
    out = model(ids, labels=labels, use_cache=False)
    logits = out.logits[:, :-1].reshape(-1, cfg.vocab_size)
    target = labels[:, 1:].reshape(-1)
    keep = target != -100
    ref = -torch.log_softmax(logits[keep], -1).gather(1, target[keep, None]).mean()
    assert torch.allclose(out.loss, ref, atol=1e-6)


def test_save_load_round_trip_via_auto_classes(tmp_path):
    cfg = tiny()
    model = make(cfg)
    with torch.no_grad():  # make the buffers that a checkpoint must carry non-default
        model.model.moe_layers()[0].expert_bias.uniform_(-0.5, 0.5)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "quasar_long"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # no trust_remote_code
    assert isinstance(loaded, QuasarLongForCausalLM)
    ids = torch.randint(0, cfg.vocab_size, (2, 25))
    with torch.no_grad():
        assert torch.equal(model(ids, use_cache=False).logits, loaded(ids, use_cache=False).logits)
    assert torch.equal(model.model.moe_layers()[0].expert_bias, loaded.model.moe_layers()[0].expert_bias)


def test_generate_with_and_without_cache_agree_including_left_padding(recwarn, caplog):
    cfg = tiny()
    model = make(cfg)
    prompt = torch.randint(1, cfg.vocab_size, (2, 20))
    mask = torch.ones_like(prompt)
    prompt[1, :6], mask[1, :6] = 0, 0
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(prompt, attention_mask=mask, use_cache=True, **kw)
        uncached = model.generate(prompt, attention_mask=mask, use_cache=False, **kw)
    assert cached.shape == (2, 32)
    assert torch.equal(cached, uncached)
    # the forward signature follows the installed transformers: generate() warns about nothing
    said = [str(w.message) for w in recwarn] + [r.getMessage() for r in caplog.records]
    assert not [m for m in said if "deprecated" in m or "past_key_values" in m], said


def test_the_old_cache_keyword_still_reaches_the_cache():
    cfg = tiny()
    model = make(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 9))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = QuasarLongCache()
        with pytest.warns(FutureWarning, match="past_key_values"):
            model(ids[:, :5], past_key_values=cache)
        rest = model(ids[:, 5:], cache=cache).logits
    assert cache.get_seq_length() == 9  # not swallowed by **kwargs: the first call filled it
    assert (rest - full[:, 5:]).abs().max().item() <= 1e-4


def test_preview_on_meta_device_counts_and_branch_layout():
    cfg = QuasarLongConfig.preset("preview")
    counts = parameter_counts(cfg)
    assert 16e9 <= counts["total"] <= 19e9
    assert 1.4e9 <= counts["active"] <= 2.5e9
    kinds = {i: cfg.branch_kind(i) for i in range(cfg.num_hidden_layers)}
    assert [i for i, k in kinds.items() if k == "raven"] == [5, 10, 15]
    assert [i for i, k in kinds.items() if k == "gla"] == [8, 13, 18]
    assert [i for i, k in kinds.items() if k == "quasar"] == [4, 6, 7, 9, 11, 12, 14, 16, 17, 19]
    assert all(kinds[i] is None for i in range(4))


def test_small_and_dense_presets_are_comparable_sizes():
    small, dense = parameter_counts(QuasarLongConfig.preset("small")), parameter_counts(QuasarLongConfig.preset("dense"))
    assert 100e6 <= small["total"] <= 200e6
    assert dense["experts_routed"] == 0 and dense["branches"] == 0
    assert 0.5 <= dense["total"] / small["active"] <= 1.5


def test_dense_baseline_runs_and_has_no_branches_or_experts():
    cfg = QuasarLongConfig.preset("dense", vocab_size=300, hidden_size=64, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16, intermediate_size=128)
    model = make(cfg)
    assert not model.model.moe_layers()
    assert not any(layer.is_hybrid for layer in model.model.layers)
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        assert (model(ids, use_cache=False).logits - decode_token_by_token(model, ids)).abs().max() <= 1e-4


def test_replace_mode_layers_have_no_attention_and_pack_like_separate_documents():
    cfg = tiny(hybrid_replacement_mode="replace")
    model = make(cfg)
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.startswith("model.layers.1.mixer.attn.") or n == "model.layers.1.mixer.alpha" for n in names)
    assert any(n.startswith("model.layers.0.mixer.qkv_proj") for n in names)      # non-hybrid layer 0 keeps GQA
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in make(tiny()).parameters())
    docs = [torch.randint(0, cfg.vocab_size, (n,)) for n in (11, 20)]
    with torch.no_grad():
        packed = model(torch.cat(docs)[None], position_ids=torch.cat([torch.arange(11), torch.arange(20)])[None],
                       use_cache=False).logits[0]
        separate = torch.cat([model(d[None], use_cache=False).logits[0] for d in docs])
        hs = model(docs[0][None], use_cache=False, output_hidden_states=True).hidden_states
    assert (packed - separate).abs().max() <= 1e-4
    # hidden states: embeddings, then every layer's output, the last one normed (Hugging Face's convention)
    assert len(hs) == cfg.num_hidden_layers + 1
    torch.testing.assert_close(hs[-1], model.model(docs[0][None], use_cache=False).last_hidden_state)
    torch.testing.assert_close(hs[0], model.model.embed_tokens(docs[0][None]))


@pytest.mark.parametrize("bad, field", [
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(n_group=3), "n_group"),
    (dict(topk_group=5), "topk_group"),
    (dict(hybrid_raven_topk=9), "hybrid_raven_topk"),
    (dict(hybrid_layerwise_cycle=["quasar", "mamba"]), "hybrid_layerwise_cycle"),
    (dict(hybrid_attention_layers=[1, 6]), "hybrid_attention_layers"),
    (dict(engram_layers=[7]), "engram_layers"),
    (dict(latent_memory_layers=[6]), "latent_memory_layers"),
    (dict(partial_rotary_factor=0.3), "partial_rotary_factor"),
    (dict(long_context_mode="yarn"), "long_context_mode"),
    (dict(moe_balancing="aux_loss"), "moe_balancing"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(hybrid_replacement_mode="swap"), "hybrid_replacement_mode"),
])
def test_invalid_configs_fail_naming_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        QuasarLongConfig.preset("tiny", **bad)


def test_bad_inputs_are_refused_clearly():
    model = make(tiny())
    ids = torch.randint(0, 384, (1, 8))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids"):
        model(inputs_embeds=torch.randn(1, 8, 64))  # engram needs the ids
    with pytest.raises(ValueError, match="packed"):
        model(ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]]), cache=QuasarLongCache())


# ----------------------------------------------------------------------------------------------
# Quasar branch with the optional state decay (gated delta rule)


def _quasar_branches(model):
    from quasar_model.layers.quasar import QuasarBranch
    return [m for m in model.modules() if isinstance(m, QuasarBranch)]


def test_quasar_decay_full_forward_equals_token_by_token_decoding():
    cfg = tiny(hybrid_quasar_use_decay=True)
    model = make(cfg)
    branches = _quasar_branches(model)
    assert branches and all(b.use_decay for b in branches)
    for b in branches:  # Mamba2 init: A = exp(A_log) in (0, 16], softplus(dt_bias) in [1e-3, 0.1]
        assert (b.A_log.exp() <= 16 + 1e-4).all()
        dt = torch.nn.functional.softplus(b.dt_bias)
        assert (dt >= 1e-3 - 1e-6).all() and (dt <= 0.1 + 1e-6).all()
    ids = torch.randint(0, cfg.vocab_size, (2, 45))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        step = decode_token_by_token(model, ids)
    assert full.abs().max() > 0.5
    assert (full - step).abs().max().item() <= 1e-4


def test_quasar_decay_changes_logits_and_adds_parameters_only_when_on():
    ids = torch.randint(0, 100, (1, 40))
    off, on = make(tiny()), make(tiny(hybrid_quasar_use_decay=True))
    names_off = {n for n, _ in off.named_parameters()}
    names_on = {n for n, _ in on.named_parameters()}
    extra = names_on - names_off
    assert names_off <= names_on and extra
    n_quasar = len(_quasar_branches(on))
    assert n_quasar > 0 and len(extra) == 3 * n_quasar
    assert all(n.endswith(("branch.A_log", "branch.dt_bias", "branch.decay_proj.weight")) for n in extra)
    assert not any("decay_proj" in n for n in names_off)
    # same weights everywhere else: the decay alone moves the logits
    missing, unexpected = on.load_state_dict(off.state_dict(), strict=False)
    assert set(missing) == extra and not unexpected
    with torch.no_grad():
        l_off, l_on = off(ids, use_cache=False).logits, on(ids, use_cache=False).logits
        assert (_quasar_branches(on)[0].log_decay(torch.randn(1, 5, on.config.hidden_size)) < 0).all()
        assert not torch.allclose(l_off, l_on, atol=1e-3)
        for b in _quasar_branches(on):  # A -> 0 turns the decay off: back to the ungated branch
            b.A_log.fill_(-40.0)
        l_nodecay = on(ids, use_cache=False).logits
    assert (l_nodecay - l_off).abs().max() <= 1e-5


def test_quasar_decay_padding_and_packing():
    cfg = tiny(hybrid_quasar_use_decay=True)
    model = make(cfg)
    long_ids = torch.randint(1, cfg.vocab_size, (1, 30))
    short_ids = torch.randint(1, cfg.vocab_size, (1, 21))
    batch = torch.cat([long_ids, torch.cat([torch.zeros(1, 9, dtype=torch.long), short_ids], 1)])
    mask = torch.ones_like(batch)
    mask[1, :9] = 0
    docs = [torch.randint(0, cfg.vocab_size, (n,)) for n in (11, 20, 9)]
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        out = model(batch, attention_mask=mask, use_cache=False).logits
        ref_short = model(short_ids, use_cache=False).logits
        packed = model(torch.cat(docs)[None], position_ids=pos, use_cache=False).logits[0]
        separate = torch.cat([model(d[None], use_cache=False).logits[0] for d in docs])
    assert (out[1, 9:] - ref_short[0]).abs().max() <= 1e-4
    assert (packed - separate).abs().max() <= 1e-4
