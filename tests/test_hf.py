"""Hugging Face transformers, captured by torch.export: tiny models built from
config objects (nothing downloaded), with every parameter and buffer made
non-trivial. Each spec is checked by function (random permutations of every
group, outputs compared) and its structure against what the architecture
allows. The whole zoo is ``benchmarks/zoo_hf.py``; CI runs this dozen."""
from __future__ import annotations

import pytest
import torch
import transformers as T

import autobasin as ab
from autobasin.infer import infer_spec
from autobasin.testing import randomize_state_

IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
TEXT = {"input_ids": IDS}
SEQ2SEQ = {"input_ids": IDS, "decoder_input_ids": IDS[:, :5]}
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
             vocab_size=64, max_position_embeddings=64)
VISION = {k: v for k, v in SMALL.items() if k not in ("vocab_size", "max_position_embeddings")}

MODELS = {
    "bert": lambda: (T.BertForSequenceClassification(T.BertConfig(**SMALL)), TEXT),
    "roberta": lambda: (T.RobertaForMaskedLM(T.RobertaConfig(**SMALL)), TEXT),
    "albert": lambda: (T.AlbertForMaskedLM(T.AlbertConfig(embedding_size=16, **SMALL)), TEXT),
    "gpt2": lambda: (T.GPT2LMHeadModel(T.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4,
                                                    n_positions=64, bos_token_id=0,
                                                    eos_token_id=0)), TEXT),
    "llama": lambda: (T.LlamaForCausalLM(T.LlamaConfig(num_key_value_heads=2, **SMALL)), TEXT),
    "llama_tied": lambda: (T.LlamaForCausalLM(T.LlamaConfig(num_key_value_heads=2,
                                                            tie_word_embeddings=True, **SMALL)), TEXT),
    "qwen2": lambda: (T.Qwen2ForCausalLM(T.Qwen2Config(num_key_value_heads=2, **SMALL)), TEXT),
    "gemma": lambda: (T.GemmaForCausalLM(T.GemmaConfig(num_key_value_heads=2, head_dim=8, **SMALL)), TEXT),
    "bloom": lambda: (T.BloomForCausalLM(T.BloomConfig(hidden_size=32, n_layer=2, n_head=4,
                                                       vocab_size=64)), TEXT),
    "t5": lambda: (T.T5ForConditionalGeneration(T.T5Config(d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                                           num_heads=4, vocab_size=64)), SEQ2SEQ),
    "mixtral": lambda: (T.MixtralForCausalLM(T.MixtralConfig(num_key_value_heads=2, num_local_experts=4,
                                                             num_experts_per_tok=2, **SMALL)), TEXT),
    "bart": lambda: (T.BartForConditionalGeneration(T.BartConfig(
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, vocab_size=64,
        max_position_embeddings=64)), SEQ2SEQ),
    "vit": lambda: (T.ViTForImageClassification(T.ViTConfig(image_size=32, patch_size=8, **VISION)),
                    {"pixel_values": torch.randn(2, 3, 32, 32)}),
    # config variants a checkpoint may carry (biases, one key-value head, scaled RoPE, a
    # head dim of its own, shared experts, soft-capping, ALiBi, partial rotary, relative
    # attention, a gated T5 with an untied head, a state-space model)
    "llama_bias_mqa": lambda: (T.LlamaForCausalLM(T.LlamaConfig(
        num_key_value_heads=1, attention_bias=True, mlp_bias=True, **SMALL)), TEXT),
    "llama_rope_scaled_head_dim": lambda: (T.LlamaForCausalLM(T.LlamaConfig(
        num_key_value_heads=2, head_dim=16, rope_scaling={"rope_type": "linear", "factor": 2.0},
        **SMALL)), TEXT),
    "qwen2_moe_shared": lambda: (T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
        shared_expert_intermediate_size=40, **SMALL)), TEXT),
    "gemma2": lambda: (T.Gemma2ForCausalLM(T.Gemma2Config(num_key_value_heads=2, head_dim=8,
                                                          **SMALL)), TEXT),
    "falcon_alibi": lambda: (T.FalconForCausalLM(T.FalconConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=True,
        new_decoder_architecture=False)), TEXT),
    "gpt_neox_partial_rotary": lambda: (T.GPTNeoXForCausalLM(T.GPTNeoXConfig(
        rotary_pct=0.5, use_parallel_residual=False, **SMALL)), TEXT),
    "deberta_v2_relative": lambda: (T.DebertaV2ForMaskedLM(T.DebertaV2Config(
        relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=8, **SMALL)), TEXT),
    "t5_gated_untied": lambda: (T.T5ForConditionalGeneration(T.T5Config(
        d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, vocab_size=64,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False)), SEQ2SEQ),
    # DeepSeek-V3: multi-head latent attention (low-rank q and kv, a shared RoPE key),
    # routed experts with a group-limited router and a shared expert, the first layer dense
    "deepseek_v3_mla": lambda: (T.DeepseekV3ForCausalLM(T.DeepseekV3Config(
        num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
        n_shared_experts=1, moe_intermediate_size=24, first_k_dense_replace=1, n_group=1,
        topk_group=1, **SMALL)), TEXT),
    "jetmoe_sorted_dispatch": lambda: (T.JetMoeForCausalLM(T.JetMoeConfig(
        hidden_size=32, num_hidden_layers=2, num_key_value_heads=2, kv_channels=8, intermediate_size=48,
        vocab_size=64, max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2)), TEXT),
    "mamba": lambda: (T.MambaForCausalLM(T.MambaConfig(vocab_size=64, hidden_size=32, state_size=8,
                                                       num_hidden_layers=2, expand=2)), TEXT),
}


def build(name: str):
    torch.manual_seed(0)
    model, inputs = MODELS[name]()
    model.eval()
    randomize_state_(model)
    return model, inputs


def residual_group(model, spec) -> str | None:
    """The group acting on the word (or patch) embedding's hidden axis."""
    emb = model.get_input_embeddings()
    weight = getattr(emb, "weight", None)
    if weight is None:  # ViT: the patch projection's output channels
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        weight, axis = conv.weight, 0
    else:
        axis = 1
    names = [n for n, t in model.state_dict(keep_vars=True).items() if t is weight]
    return next((g.name for g in spec.groups.values() for m in g.members
                 if m.param in names and m.axis == axis), None)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_hf_model_spec_is_exact_with_its_residual_stream_permuted(name):
    model, inputs = build(name)
    # an encoder-decoder also returns the encoder's last hidden state: only the
    # logits define what it computes, so the encoder's stream may move
    outputs = ["logits"] if name.startswith(("t5", "bart")) else None
    spec = infer_spec(model, inputs, outputs=outputs)
    assert spec.capture == "export"  # fx cannot trace an HF top-level forward
    for seed in (0, 1):
        assert ab.check_equivalence(model, spec, inputs, seed=seed) <= 1e-4
    # another batch than the one it was inferred on: the spec holds for any input
    other = {k: (torch.randint(0, 64, v.shape) if v.dtype == torch.long else torch.randn(v.shape))
             for k, v in inputs.items()}
    assert ab.check_equivalence(model, spec, other, seed=2) <= 1e-4
    assert spec.coverage() >= 0.9, spec.fixed_axes()[:5]
    assert residual_group(model, spec) is not None


def test_llama_spec_has_the_grouped_query_attention_structure():
    """Residual stream, kv heads x query groups, value head-dim and SwiGLU units
    permute; the q/k head-dim stays fixed (RoPE gives each dimension its own
    frequency), with that reason given."""
    model, inputs = build("llama")
    spec = infer_spec(model, inputs)
    sizes = sorted(g.size for g in spec.groups.values())
    # per layer: 2 kv heads, 2 query heads per kv head, 8 value head-dims, 48 MLP units; + residual 32
    assert sizes == sorted([2, 2, 8, 48] * 2 + [32])
    q = "model.layers.0.self_attn.q_proj.weight"
    on_q = [m for g in spec.groups.values() for m in g.members if m.param == q and m.axis == 0]
    assert sorted(m.shape for m in on_q) == [(2, 2, 8), (2, 2, 8)]  # kv head and group, not head-dim
    assert {m.dim for m in on_q} == {0, 1}
    assert residual_group(model, spec) is not None
    assert len([g for g in spec.groups.values() if g.size == 32]) == 1  # one stream, head untied


def test_tied_embedding_and_head_share_the_residual_permutation():
    model, inputs = build("llama_tied")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    spec = infer_spec(model, inputs)
    stream = spec.groups[residual_group(model, spec)]
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= {m.param for m in stream.members}
    perms = ab.random_permutation(spec, seed=3)
    aligned = ab.permute_model(model, spec, perms)
    assert aligned.lm_head.weight is aligned.model.embed_tokens.weight
    with torch.no_grad():
        ref, out = model(**inputs).logits, aligned(**inputs).logits
    assert torch.allclose(ref, out, atol=1e-5)


def test_auto_rebasin_aligns_two_hf_llamas_and_verifies_with_keyword_inputs():
    a, inputs = build("llama")
    torch.manual_seed(1)
    b = T.LlamaForCausalLM(a.config).eval()
    randomize_state_(b, seed=1)
    spec = infer_spec(a, inputs)
    # b is a itself with its hidden units shuffled: matching must undo it exactly
    shuffled = ab.permute_model(a, spec, ab.random_permutation(spec, seed=5))
    result = ab.auto_rebasin(a, shuffled, inputs, spec=spec, progress=False)
    assert result.stats["verify_error"] <= 1e-4
    for k, t in a.state_dict().items():
        assert torch.allclose(t, result.state_dict[k], atol=1e-6), k
    result = ab.auto_rebasin(a, b, inputs, progress=False)
    assert result.stats["verify_error"] <= 1e-4


def test_activation_matching_of_hf_llamas_takes_token_batches_given_either_way():
    """Captured with ``input_ids=`` by name; batches give the ids positionally (a
    plain tensor) or by name (a dict): both reach the captured graph."""
    a, inputs = build("llama")
    spec = infer_spec(a, inputs)
    shuffled = ab.permute_model(a, spec, ab.random_permutation(spec, seed=2))
    vocab, shape = a.config.vocab_size, inputs["input_ids"].shape
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, vocab, (4, shape[1]), generator=gen) for _ in range(3)]
    for data in (ids, [{"input_ids": t} for t in ids]):
        result = ab.auto_rebasin(a, shuffled, inputs, spec=spec, method="activation", data=data,
                                 progress=False)
        assert result.matching.fallback_groups == [] and result.matching.batches == 3
        for k, t in a.state_dict().items():  # the shuffle is undone exactly
            assert torch.allclose(t, result.state_dict[k], atol=1e-6), k
    # a last, smaller batch: the graph torch.export captured keeps its shapes, so it
    # is left out, and said so
    with pytest.warns(UserWarning, match="left out 1 batch"):
        result = ab.auto_rebasin(a, shuffled, inputs, spec=spec, method="activation",
                                 data=ids + [ids[0][:1]], progress=False)
    assert result.matching.batches == 3 and result.matching.skipped_batches == 1


def test_capture_fx_on_an_hf_model_names_the_failure_and_auto_falls_back():
    model, inputs = build("gpt2")
    with pytest.raises(ab.TraceError, match="GPT2LMHeadModel"):
        infer_spec(model, inputs, capture="fx")
    assert infer_spec(model, inputs, capture="auto").capture == "export"


def test_encoder_decoder_outputs_decide_whether_the_encoder_stream_moves():
    """With every output kept, T5's encoder_last_hidden_state ties its residual
    stream to the output (structural, not counted as hidden); with
    outputs=["logits"] it is permuted, and the checks compare the logits only."""
    model, inputs = build("t5")
    full = infer_spec(model, inputs)
    assert residual_group(model, full) is None
    assert "structural" in full.axis_kinds("shared.weight")
    logits_only = infer_spec(model, inputs, outputs=["logits"])
    assert residual_group(model, logits_only) is not None
    assert logits_only.outputs == ["logits"]
    again = ab.PermutationSpec.from_json(logits_only.to_json())
    assert again.outputs == ["logits"]
    perms = ab.random_permutation(logits_only, seed=1)
    moved = ab.permute_model(model, logits_only, perms)
    with torch.no_grad():
        ref, out = model(**inputs, use_cache=False), moved(**inputs, use_cache=False)
    assert torch.allclose(ref.logits, out.logits, atol=1e-5)
    assert not torch.allclose(ref.encoder_last_hidden_state, out.encoder_last_hidden_state)
    with pytest.raises(ab.EquivalenceError):  # all outputs compared: the hidden state moved
        ab.check_equivalence(model, ab.PermutationSpec(
            logits_only.groups.values(), logits_only.tensors), inputs, seed=1)
    with pytest.raises(KeyError, match="logits"):
        infer_spec(model, inputs, outputs=["logitz"])


def test_mixtral_experts_permute_with_the_router_rows():
    """The router's topk indices pick experts by position: permuting the
    experts (axis 0 of the stacked expert weights) together with the router's
    rows renumbers them consistently; each expert's hidden units permute too."""
    model, inputs = build("mixtral")
    spec = infer_spec(model, inputs)
    experts = {m.param: m for g in spec.groups.values() for m in g.members
               if m.param.startswith("model.layers.0.mlp.") and m.axis == 0 and g.size == 4}
    assert set(experts) == {"model.layers.0.mlp.gate.weight", "model.layers.0.mlp.experts.gate_up_proj",
                            "model.layers.0.mlp.experts.down_proj"}
    assert len({g.name for g in spec.groups.values() for m in g.members
                if m.param == "model.layers.0.mlp.gate.weight" and m.axis == 0}) == 1
    assert "permuted" in spec.axis_kinds("model.layers.0.mlp.experts.gate_up_proj")[1:]
    for seed in (0, 1, 2):
        assert ab.check_equivalence(model, spec, inputs, seed=seed) <= 1e-4


def test_jetmoe_experts_dispatched_by_sorting_permute_with_the_router_rows():
    """JetMoE sorts the picks by expert, splits the rows by the picks' histogram
    and multiplies each piece by its expert's weight, in its MLP and in its
    mixture of attention heads: both sets of experts permute with their router."""
    model, inputs = build("jetmoe_sorted_dispatch")
    spec = infer_spec(model, inputs)
    for part in ("mlp.", "self_attention.experts."):
        p = f"model.layers.0.{part}"
        (group,) = [g for g in spec.groups.values()
                    if any(m.param == p + "router.layer.weight" and m.axis == 0 for m in g.members)]
        assert {(m.param, m.axis) for m in group.members} == {
            (p + "input_linear.weight", 0), (p + "output_linear.weight", 0),
            (p + "router.layer.weight", 0)}, str(spec)
    for seed in (0, 1, 2):
        assert ab.check_equivalence(model, spec, inputs, seed=seed) <= 1e-4


def test_deepseek_v3_latent_attention_and_experts_have_their_structure():
    """Multi-head latent attention: the q and kv latent ranks permute (each with its
    RMSNorm), heads permute across q, k, v and o, the non-rotary q/k head-dim and the
    value head-dim each permute within a head, and only the RoPE dimensions stay fixed,
    for that reason. The routed experts permute with the router's rows and its
    correction bias; each expert's hidden units and the shared expert's permute too."""
    model, inputs = build("deepseek_v3_mla")
    spec = infer_spec(model, inputs)
    layer = "model.layers.1."

    def acting(param, axis, size):
        return [g for g in spec.groups.values() if g.size == size and
                any(m.param == layer + param and m.axis == axis for m in g.members)]

    q_rank, kv_rank = acting("self_attn.q_a_proj.weight", 0, 16), \
        acting("self_attn.kv_a_proj_with_mqa.weight", 0, 16)
    assert len(q_rank) == 1 and layer + "self_attn.q_a_layernorm.weight" in \
        {m.param for m in q_rank[0].members}
    assert len(kv_rank) == 1 and layer + "self_attn.kv_a_layernorm.weight" in \
        {m.param for m in kv_rank[0].members}
    heads = acting("self_attn.q_b_proj.weight", 0, 4)
    assert len(heads) == 1 and {layer + p for p in ("self_attn.kv_b_proj.weight",
                                                    "self_attn.o_proj.weight")} <= \
        {m.param for m in heads[0].members}
    assert len(acting("self_attn.q_b_proj.weight", 0, 8)) == 1  # non-rotary q/k head-dim
    assert len(acting("self_attn.o_proj.weight", 1, 8)) == 1  # value head-dim
    experts = acting("mlp.experts.gate_up_proj", 0, 4)
    assert len(experts) == 1 and {layer + "mlp.gate.weight", layer + "mlp.gate.e_score_correction_bias",
                                  layer + "mlp.experts.down_proj"} <= {m.param for m in experts[0].members}
    assert len(acting("mlp.experts.gate_up_proj", 1, 24)) == 1
    assert len(acting("mlp.shared_experts.gate_proj.weight", 0, 24)) == 1
    rope = [a for a, why in spec.fixed_axes() if a.startswith(layer)]
    assert rope and all("inv_freq" in why for a, why in spec.fixed_axes() if a.startswith(layer))


@pytest.mark.parametrize("name,rotated", [("llama", 8), ("gpt_neox_partial_rotary", 4),
                                          ("llama_rope_scaled_head_dim", 16)])
def test_rope_head_dims_take_pair_rotations(name, rotated):
    """With invertible maps asked for, the q/k head dim (its rotated part, for
    partial rotary) carries rotations times scales of its RoPE frequency pairs
    (``rotate_half``: i with i + d/2), with k under the inverse-transpose; any
    element of them keeps the logits. GPT-NeoX's pass-through part is a
    general invertible group of its own."""
    model, inputs = build(name)
    spec = infer_spec(model, inputs, symmetries="all")
    rope = [g for g in spec.groups.values() if g.kind == "rotary"]
    assert len(rope) == 2 and all(g.size == rotated for g in rope)
    half = rotated // 2
    assert all(g.pairs == tuple(list(range(half, rotated)) + list(range(half))) for g in rope)
    assert all(any(m.contra for m in g.members) and not all(m.contra for m in g.members)
               for g in rope)
    if name == "gpt_neox_partial_rotary":
        assert sum(g.kind == "invertible" and any("query_key_value" in m.param and
                                                  m.contra for m in g.members)
                   for g in spec.groups.values()) == 2
    for seed in range(2):
        assert ab.check_equivalence(model, spec, inputs, seed=seed) < 1e-4
