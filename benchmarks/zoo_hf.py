"""Hugging Face transformers zoo: infer a PermutationSpec for every model type
of transformers' auto mapping, built from a tiny config, and check it.

Every model type that has a base model class (``MODEL_MAPPING_NAMES`` of
``transformers.models.auto.modeling_auto``) is tried. Nothing is downloaded:
each model is built from a config object. For each type, in its own subprocess
(a crash, a hang or a memory blow-up of one model does not stop the sweep),
the worker

1. makes a tiny config: the config class with its defaults, shrunk generically
   (:func:`shrink_kwargs`: hidden width 64, 2 layers, 4 heads / 2 key-value
   heads, feed-forward 128, vocabulary 128, 128 positions, 32x32 images, MoE
   with 4 experts of which 2 per token, ...), sub-configs (``text_config``,
   ``vision_config``, ``encoder``/``decoder``, ...) shrunk the same way, then
   the few documented per-type overrides of :data:`OVERRIDES`. When a model
   does not build or run at that size, milder levels are tried
   (:data:`LEVELS`: as many key-value heads as heads, then no generic shrinking
   of unnamed sizes, then 64x64 images,
   then only the depth, then the defaults), each only under
   :data:`MAX_PARAMS` parameters (counted on the meta device first);
2. builds the type's model with transformers' own head when it has one (the
   first of :data:`HEAD_MAPPINGS` that maps the type: ``...ForConditionalGeneration``,
   ``...ForMaskedLM``, ``...ForCausalLM``, ``...ForImageClassification``, ...;
   it contains the base model), else the base model class, with
   ``attn_implementation="sdpa"`` (``"eager"`` when sdpa is not supported),
   in eval mode, every parameter and buffer made non-trivial
   (:func:`autobasin.testing.randomize_state_`). A head matters: the base
   model's output *is* its residual stream (``last_hidden_state``), which no
   spec may permute; behind a head the stream is hidden. ``--base`` builds
   the base model class instead;
3. makes keyword inputs of batch 2 from forward's signature: ``input_ids``
   (length 8, ids that are no special token), ``decoder_input_ids`` (length 5)
   when forward takes them, ``pixel_values`` at the config's image size,
   ``input_features`` / ``input_values`` for audio; a multimodal forward gets
   every modality it takes when that runs, else its main input alone
   (``main_input_name``). A multimodal LM's ``input_ids`` start with one
   placeholder token per image or audio feature (counted by its
   ``get_image_features`` / ``get_audio_features``), as its processor would
   write them, for images and audio together where forward takes both; images
   also come as (batch, tiles, C, H, W) with ``image_sizes`` or
   ``pixel_attention_mask``, as Qwen-VL flat patches with ``image_grid_thw``
   and ``mm_token_type_ids``, or as SigLIP 2 flat patches
   with ``spatial_shapes``, at a side a pixel shuffle divides, where forward
   takes those; a second image input (``high_res_pixel_values``), a second
   token sequence (``protein_input_ids``) and videos
   (``pixel_values_videos``, with their own placeholders) join them. Sizes
   are looked up in every sub-config (``image_config``,
   ``encoder.vision_config``); placeholders may be wrapped in the modality's
   start / end tokens, and the text's ``attention_mask`` given, where the
   model needs that. The first input set the model runs on is used;
   Where forward takes a mode flag that switches to another path (Granite-Docling's
   ``tile_fine_mask`` / ``fine``), or an optional input reaches weights the others
   leave unused (Longformer's ``global_attention_mask``, SAM 3's ``input_boxes``;
   :data:`MODE_INPUTS`), the same inputs with them added are a further input set
   (``more_inputs``), inferred and checked on too;
   so are up to two other input sets that run modules the first leaves unused
   (:func:`reach_inputs`: Phi-4-multimodal's speech projector, used only without images);
4. times :func:`autobasin.infer.infer_spec` (``capture="auto"``; a model with
   a head is given ``outputs=["logits"]``: the logits define it, and an
   encoder-decoder's ``encoder_last_hidden_state`` would otherwise fix the
   encoder's stream);
5. permutes every group at random (two seeds) and compares the outputs
   (:func:`autobasin.check_equivalence`, relative L2 <= 1e-4).

Status: ``exact`` (every check passed), ``caught`` (a permutation changed the
outputs, or the spec does not fit the state_dict: a wrong spec that would have
shipped silently without the check), ``check-error`` (the check itself failed
for another reason), ``trace-error`` (infer_spec raised), ``create-error`` (no
tiny config of the type builds and runs offline), ``timeout``, ``crash`` (the
worker died, or used more memory than ``--mem-gb``).

Residual stream permuted: some group acts on the model's first hidden axis,
the word embedding's columns (axis 1 of ``get_input_embeddings().weight``) for
a model given ``input_ids``, else the output axis of the first Conv/Linear
weight in module order (a patch embedding's or stem's channels).

Target: of the types that build, >= 95% exact with coverage >= 0.9 and the
residual stream permuted where the model has a head (a model without one
outputs its stream, which no spec may permute); none caught.

Usage::

    python benchmarks/zoo_hf.py [--jobs 2] [--out docs/] [--timeout 180]
        [--only TYPE[,TYPE]] [--limit N] [--base] [--mem-gb G] [--update] [--render]

A full sweep writes ``OUT/zoo_hf.md`` and ``OUT/zoo_hf.json``; a partial one
(``--only``, ``--limit``, ``--base``) writes ``OUT/zoo_hf_partial.md`` and
``.json``, so the published page always comes from a full run. ``--update``
with ``--only`` re-runs those types into the published sweep; ``--render``
rewrites the page from its JSON (after a change to the page's text).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import inspect
import json
import os
import platform
import re
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from sweep import ensure_importable, finish_row, first_line, watch, work  # noqa: E402
RTOL = 1e-4
SEEDS = (0, 1)
TARGET_COVERAGE = 0.9
TARGET_SHARE = 0.95
MAX_PARAMS = 60_000_000  # a config level above this is not built

# -------------------------------------------------------------- tiny configs
HIDDEN, HEADS, KV_HEADS, LAYERS, FFN, VOCAB, POSITIONS = 64, 4, 2, 2, 128, 128, 128
IMAGE, PATCH = 32, 8
SEQ, DEC_SEQ, BATCH = 8, 5, 2
# input ids are drawn below this; special token ids that do not fit the tiny
# vocabulary are moved above it
ID_LIMIT = 99

KV_KEYS = ("num_key_value_heads", "num_kv_heads", "multi_query_group_num", "n_head_kv", "num_kv")
# named config fields and their tiny values (a field is set only when the
# config has it and its default is an int)
NAMED = {
    # width of the residual stream
    **dict.fromkeys(("hidden_size", "d_model", "n_embd", "dim", "word_embed_proj_dim",
                     "text_embed_dim", "vision_embed_dim", "d_embed",
                     # a vision tower's output, projected into the text model's stream
                     "out_hidden_size", "output_dim"), HIDDEN),
    # depth
    **dict.fromkeys(("num_hidden_layers", "n_layer", "n_layers", "num_layers", "encoder_layers",
                     "decoder_layers", "num_encoder_layers", "num_decoder_layers",
                     "num_text_layers", "num_vision_layers", "depth"), LAYERS),
    # heads
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "num_heads",
                     "encoder_attention_heads", "decoder_attention_heads",
                     "num_encoder_attention_heads", "num_decoder_attention_heads"), HEADS),
    **dict.fromkeys(KV_KEYS, KV_HEADS),
    **dict.fromkeys(("head_dim", "d_kv", "kv_channels", "attention_head_dim",
                     "attention_head_size"), HIDDEN // HEADS),
    "rotary_dim": HIDDEN // HEADS // 2,
    # feed-forward
    **dict.fromkeys(("intermediate_size", "ffn_dim", "d_ff", "n_inner", "encoder_ffn_dim",
                     "decoder_ffn_dim", "ffn_hidden_size", "mlp_dim", "inner_dim"), FFN),
    **dict.fromkeys(("moe_intermediate_size", "shared_expert_intermediate_size",
                     "expert_intermediate_size", "moe_ffn_hidden_size"), FFN // 2),
    # mixtures of experts: 4 experts, 2 per token, the first layer dense
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts",
                     "num_routed_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "num_experts_per_token",
                     "moe_k"), 2),
    **dict.fromkeys(("n_shared_experts", "num_shared_experts"), 1),
    **dict.fromkeys(("n_group", "topk_group"), 1),
    "first_k_dense_replace": 1,
    # multi-head latent attention (DeepSeek)
    **dict.fromkeys(("q_lora_rank", "kv_lora_rank"), 32),
    # (rope part = head_dim: DeepSeek's rotary embedding is sized by head_dim)
    "qk_rope_head_dim": 16, "qk_nope_head_dim": 16, "v_head_dim": 16, "qk_head_dim": 32,
    # embeddings
    **dict.fromkeys(("vocab_size", "n_vocab", "entity_vocab_size",
                     # Gemma 3n / 4: a second embedding table, of per-layer inputs
                     "vocab_size_per_layer_input"), VOCAB),
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len",
                     "max_sequence_length", "max_target_positions", "max_text_len"), POSITIONS),
    "max_source_positions": 64,
    "embedding_size": HIDDEN // 2, "projection_dim": 32, "projection_size": 32,
    # vision
    "image_size": IMAGE, "patch_size": PATCH, "num_frames": 4, "tubelet_size": 2,
    "mm_tokens_per_image": 4,
    # audio
    "num_mel_bins": 16, "conv_channels": 32, "max_length": 64,
}
# list-valued fields (hierarchical vision models, convolutional feature extractors)
LIST_SCALED = ("hidden_sizes", "embed_dims", "dims", "conv_dim", "channels",
               "encoder_hidden_sizes", "decoder_hidden_sizes", "neck_hidden_sizes")
LIST_DEPTH = ("depths", "num_layers_per_stage", "encoder_layers_per_stage")
LIST_HEADS = ("num_heads", "num_attention_heads", "encoder_num_heads", "heads")
# never shrunk by the generic rule
GENERIC_SKIP = ("vocab", "position", "window", "max_", "length", "token", "image", "patch",
                "bucket", "chunk", "seq", "sampling_rate", "rate", "freq", "theta", "size_per",
                "ctx", "label", "_id", "frame", "hop", "n_fft", "stride", "kernel", "batch")
GENERIC_WORDS = ("_dim", "dim_", "_size", "size_", "rank", "channels", "_hidden", "width")

# Per-type overrides (config kwargs applied after shrinking), each with its reason.
OVERRIDES: dict[str, tuple[dict, str]] = {
    "aria": ({"projector_patch_to_query_dict": {16: 4}},
             "its projector maps each patch count to a query count, only for full-size images"),
    **dict.fromkeys(("llava_next", "llava_next_video", "llava_onevision"), (
        {"image_grid_pinpoints": [[32, 32]]},
        "its tiling picks a resolution among pinpoints made for 336-pixel images")),
    "dots3_note": ({"audio_config": {"feature_size": 8}},
                   "its audio stem's three stride-2 convolutions leave feature_size / 8 mel bins, "
                   "and the tiny conv_output_size (32) is the stem's channels (32) times them only "
                   "with 8 mel bins"),
    "voxtral": ({"audio_token_id": 24},
                "its default config names no audio token (the released checkpoints use 24)"),
    "vipllava": ({"vision_feature_layers": [-1, 0]},
                 "the vision layers it taps are picked by index from a 24-layer tower"),
    "layoutlmv3": ({"coordinate_size": 10, "shape_size": 12},
                   "its layout embedding concatenates four coordinate and two shape embeddings, "
                   "4 x coordinate_size + 2 x shape_size = hidden_size (64 at the tiny size)"),
    **dict.fromkeys(("modernvbert", "ultravbert", "granite_docling"), (
        {"vision_config": {"image_size": 64}},
        "its pixel shuffle merges 4 x 4 patches: the tower's grid must be 4 patches a side "
        "(64-pixel images of 16-pixel patches), else no image input runs")),
    "llama4": ({"vision_config": {"intermediate_size": 256}},
               "its pixel shuffle hands the projector hidden_size / ratio² = 4 x 64 channels, "
               "a width the config states as intermediate_size"),
    "muse_glimmer": ({"out_hidden_size": 256},
                     "its pixel shuffle hands the projector merge_size² x the tower's width "
                     "(4 x 64 channels), a width the config states as out_hidden_size"),
    "unlimited_ocr": ({"vision_config": {"sam_config": {"downsample_channels": [32, 64]}}},
                      "its SAM tower's last downsampling conv feeds the CLIP tower as patch "
                      "embeddings: its width must be the CLIP tower's (64 at the tiny size)"),
    "phi4_multimodal": ({"audio_config": {"audio_token_id": 102, "num_blocks": 2,
                                          "ext_pw_out_channel": 64,
                                          "depthwise_separable_out_channel": 64},
                         "vision_config": {"image_token_id": 103}},
                        "its image and audio tokens (200010, 200011) lie outside the tiny "
                        "vocabulary, and its audio encoder's depth (num_blocks, 24) and "
                        "convolution widths (1024, which must equal its hidden size) have names "
                        "the generic shrinking does not know"),
    **dict.fromkeys(("informer", "time_series_transformer"), (
        {"prediction_length": 4, "context_length": 8, "num_time_features": 1},
        "its default config leaves the forecast horizon unset (a checkpoint states it) and "
        "takes no time features")),
    "autoformer": ({"prediction_length": 4, "context_length": 8, "num_time_features": 1,
                    "label_length": 4},
                   "its default config leaves the forecast horizon unset and takes no time "
                   "features; its decoder starts from the context's last label_length steps "
                   "(10 by default, more than the tiny context of 8)"),
    "dbrx": ({"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0}},
             "its attention reads rope_theta from attn_config, which its config keeps in "
             "rope_parameters (the same default, 10000), and clamps q, k, v by clip_qkv "
             "unconditionally (DBRX's checkpoints use 8)"),
    "esm": ({"pad_token_id": 1},
            "its default config names no padding token, from which its position ids count "
            "(ESM-2 checkpoints use 1)"),
    "lfm2_moe": ({"layer_types": ["conv", "full_attention"]},
                 "its default config states no layer types, which its layers read one by one"),
    "mamba2": ({"num_heads": 8},
               "its heads x head_dim must equal expand x hidden_size (2 x 64 = 8 x 16)"),
    **dict.fromkeys(("minicpm_ocr", "minicpmv4_6", "minicpmv4_7"), (
        {"image_token_id": 100, "video_token_id": 101},
        "its default config names no image or video token (without one forward skips the "
        "vision tower): two ids of the tiny vocabulary")),
}


def _merge(base: dict, override: dict) -> dict:
    """``base`` with ``override``'s values, nested dicts merged at any depth."""
    return {**base, **{k: _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict)
                       else v for k, v in override.items()}}

# (label, generic shrink of unnamed sizes, image side, shrink widths, key-value
# heads: KV_HEADS, or HEADS where a model has no grouped-query attention: DeepSeek's
# latent attention repeats its keys by heads / kv heads although every head has its
# own, and some configs refuse kv heads != heads)
LEVELS = (
    ("tiny", True, IMAGE, True, KV_HEADS),
    ("tiny-mha", True, IMAGE, True, HEADS),
    ("tiny-named", False, IMAGE, True, KV_HEADS),
    ("tiny-img64", False, 64, True, KV_HEADS),
    ("shallow", False, None, False, KV_HEADS),
    ("default", False, None, None, KV_HEADS),
)

# transformers' head mappings, in order of preference; the first that maps a
# type gives its model (a head keeps the residual stream hidden)
HEAD_MAPPINGS = (
    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES",
    "MODEL_FOR_MASKED_LM_MAPPING_NAMES", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES",
    "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "MODEL_FOR_CTC_MAPPING_NAMES",
    "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES",
    "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES")


def _n_layers(d: dict) -> int | None:
    for k in ("num_hidden_layers", "n_layer", "n_layers", "num_layers"):
        if isinstance(d.get(k), int) and not isinstance(d.get(k), bool):
            return d[k]
    return None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


DEPTH_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "encoder_layers",
              "decoder_layers", "num_encoder_layers", "num_decoder_layers", "num_text_layers",
              "num_vision_layers", "depth")
WIDTH_KEYS = ("hidden_size", "d_model", "n_embd", "dim")
# fields that may default to None, meaning "set me" (a model does not build without them)
NONE_SET = ("vocab_size", "n_routed_experts", "num_experts_per_tok", "head_dim", "n_shared_experts",
            "num_key_value_heads")


def _widths(d: dict) -> set[int]:
    """The default widths of the residual streams in a config tree."""
    found = set()
    for k, v in d.items():
        if isinstance(v, dict):
            found |= _widths(v)
        elif k in WIDTH_KEYS and _is_int(v):
            found.add(v)
    return found


def shrink_kwargs(cfg, generic: bool, image: int | None, widths: bool | None,
                  stream_widths: set[int] | None = None, kv_heads: int = KV_HEADS) -> dict:
    """Config kwargs that make ``cfg`` (a default config) tiny; sub-configs
    are returned as dicts (their defaults updated with their own shrunk
    kwargs). ``widths`` False: only the depth; None: nothing but the
    sub-configs' depth. Rules, in order, for a field of the defaults:

    - a named field (:data:`NAMED`) takes its tiny value when that is smaller;
    - an unnamed size whose default equals a residual stream's width anywhere
      in the config tree (a projection into the stream, a codebook of its
      width) becomes :data:`HIDDEN`;
    - with ``generic``, any other unnamed size of 256 or more becomes 32;
    - lists: stage depths become 1, stage widths are scaled down, stage heads
      are divided by the first stage's;
    - per-layer lists (and per-layer dicts keyed by layer index) follow the depth;
    - the image side shrinks with a patch size that divides it;
    - special token ids beyond the tiny vocabulary move into its top.
    """
    from transformers import PretrainedConfig

    d = cfg.to_dict()
    if stream_widths is None:
        stream_widths = _widths(d)
    out: dict = {}
    subs = dict(getattr(cfg, "sub_configs", None) or {})
    for k in ("encoder", "decoder", "text_config", "vision_config", "audio_config",
              "backbone_config", "qformer_config", "speech_config", "prior_config"):
        if isinstance(getattr(cfg, k, None), PretrainedConfig):
            subs.setdefault(k, None)
    for k in subs:
        sub = getattr(cfg, k, None)
        if isinstance(sub, PretrainedConfig):
            kw = shrink_kwargs(sub, generic, image, widths, stream_widths, kv_heads)
            out[k] = {**sub.to_dict(), **kw}
    if widths is None:
        return out
    for k, v in d.items():
        if k in out or not isinstance(k, str) or k.startswith("_") or k in ("image_size", "patch_size"):
            continue
        if k in NAMED and (_is_int(v) or v is None and k in NONE_SET):
            if not widths and k not in DEPTH_KEYS:
                continue
            new = kv_heads if NAMED[k] == KV_HEADS and k in KV_KEYS else NAMED[k]
            if k in ("projection_dim", "projection_size") and v in stream_widths:
                new = HIDDEN  # a projection into a residual stream keeps its width
            if v is None or v > new or k == "first_k_dense_replace":
                out[k] = new
        elif not widths:
            continue
        elif isinstance(v, (list, tuple)) and v and all(_is_int(x) for x in v):
            if k in LIST_DEPTH:
                out[k] = [min(x, 1) for x in v]
            elif k in LIST_SCALED and max(v) > 64:
                f = max(1, min(v) // 16)
                out[k] = [max(4, x // f) for x in v]
            elif k in LIST_HEADS and len(v) > 1:
                out[k] = [max(1, x // v[0]) for x in v]
        elif _is_int(v) and k not in NAMED and v >= 64 and any(w in k for w in GENERIC_WORDS) \
                and not any(w in k for w in GENERIC_SKIP):
            if v in stream_widths:
                out[k] = HIDDEN
            elif generic and v >= 256:
                out[k] = 32
    # per-layer lists, patterns and dicts follow the depth
    layers_default = _n_layers(d)
    new_layers = _n_layers({**d, **out})
    if layers_default and new_layers and new_layers < layers_default and layers_default >= 3:
        for k, v in d.items():
            if k in out or k in NAMED:
                continue
            if isinstance(v, (list, tuple)) and len(v) == layers_default or \
                    isinstance(v, str) and len(v) == layers_default and len(v) >= 6 and "act" not in k:
                out[k] = v[:new_layers]
            elif isinstance(v, dict) and v and all(str(x).isdigit() for x in v):
                out[k] = {x: y for x, y in v.items() if int(x) < new_layers}
        for k in ("out_features", "out_indices"):  # backbone stages that no longer exist
            if d.get(k) is not None:
                out[k] = None
    # layers tapped by index (Qwen3-VL's deepstack): distinct layers of the shallower
    # stack, made as deep as there are taps
    key = next((k for k in DEPTH_KEYS if _is_int(out.get(k))), None)
    if key is not None:
        for k, v in d.items():
            if k not in out and isinstance(v, (list, tuple)) and v and \
                    all(_is_int(x) and x >= 0 for x in v) and len(set(v)) == len(v) and \
                    k.endswith(("index", "indices", "indexes")) and max(v) >= out[key]:
                out[key] = max(out[key], len(v))
                out[k] = list(range(len(v)))
        # one layer tapped by index (MiniCPM-V inserts its merger after layer 6): the
        # shallower stack's first layer, so that layers still follow it
        for k, v in d.items():
            if k not in out and isinstance(k, str) and k.endswith("_layer_id") and _is_int(v) \
                    and v >= out[key] > 1:
                out[k] = 0
    if image is not None:
        img = d.get("image_size")
        if _is_int(img) and img > image or isinstance(img, (list, tuple)) and len(img) == 2 \
                and all(_is_int(x) for x in img) and max(img) > image:
            out["image_size"] = image if _is_int(img) else [image, image]
            p = d.get("patch_size")
            if _is_int(p) and (image % p != 0 or p > image // 2):
                out["patch_size"] = PATCH if image % PATCH == 0 else 4
            elif isinstance(p, (list, tuple)) and len(p) == 2:
                out["patch_size"] = [PATCH, PATCH]
    # multimodal RoPE (Qwen2-VL, GLM-4V) splits the rotary half of the head into sections
    # for time, height and width; a config that states none gets the model's hard-coded
    # sections for the full-size head: sections in the same proportions (1 : 1.5 : 1.5)
    # that add up to the tiny head's rotary half. (An interleaved layout, Qwen3-VL's, takes
    # every third frequency and runs at any head size.)
    # A config that states sections for the full-size head (Cosmos 3 Edge, HY-V4-VL) gets
    # them the same way when they do not add up to the tiny head's rotary half.
    ignored = getattr(type(cfg), "ignore_keys_at_rope_validation", None) or ()
    rope = d.get("rope_parameters")
    stated = rope.get("mrope_section") if isinstance(rope, dict) else None
    if widths and isinstance(rope, dict) and (
            "mrope_section" in ignored and "mrope_interleaved" not in ignored and stated is None
            or isinstance(stated, list) and len(stated) == 3 and all(_is_int(x) for x in stated)):
        new = {**d, **out}
        hidden, heads = new.get("hidden_size"), new.get("num_attention_heads")
        # DeepSeek-style latent attention rotates only its qk_rope_head_dim part
        head_dim = new.get("qk_rope_head_dim") if _is_int(new.get("qk_rope_head_dim")) else \
            new.get("head_dim") if _is_int(new.get("head_dim")) else \
            hidden // heads if _is_int(hidden) and _is_int(heads) and heads else None
        half = int(head_dim * rope.get("partial_rotary_factor", new.get("partial_rotary_factor")
                                       or 1.0)) // 2 if head_dim else 0
        if half >= 3 and (stated is None or sum(stated) != half):
            t = max(1, half // 4)
            out["rope_parameters"] = {**rope, "mrope_section": [t, (half - t) // 2,
                                                                half - t - (half - t) // 2]}
    # special token ids beyond the tiny vocabulary
    vocab = out.get("vocab_size", d.get("vocab_size"))
    if vocab is None:  # a composite config: its token ids index the text model's vocabulary
        vocab = (out.get("text_config") or {}).get("vocab_size")
    if _is_int(vocab) and vocab <= VOCAB:
        nxt = [vocab - 1]

        def fit(x):
            if _is_int(x) and x >= ID_LIMIT:
                nxt[0] -= 1
                return max(ID_LIMIT, nxt[0] + 1)
            return x

        for k, v in d.items():
            if k in out or not isinstance(k, str) or not (
                    k.endswith(("token_id", "token_index", "token_ids", "_token"))):
                continue
            if _is_int(v) and v >= ID_LIMIT:
                out[k] = fit(v)
            elif isinstance(v, list) and any(_is_int(x) and x >= ID_LIMIT for x in v):
                out[k] = [fit(x) for x in v]
    return out


def special_ids(cfg) -> set[int]:
    """Every token id a config names (recursively): kept out of input_ids."""
    found: set[int] = set()

    def walk(d):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v)
            elif isinstance(k, str) and "token" in k and ("id" in k or "index" in k):
                for x in (v if isinstance(v, list) else [v]):
                    if _is_int(x):
                        found.add(x)

    walk(cfg.to_dict())
    return found


def model_classes(model_type: str, base: bool) -> list[str]:
    """Class names to try, best first: the type's head (unless ``base``), then
    its base model class."""
    from transformers.models.auto import modeling_auto as ma
    names = []
    if not base:
        for mapping in HEAD_MAPPINGS:
            c = getattr(ma, mapping, {}).get(model_type)
            if isinstance(c, (list, tuple)):
                c = c[0]
            if c:
                names.append(c)
                break
    c = ma.MODEL_MAPPING_NAMES[model_type]
    names.append(c[0] if isinstance(c, (list, tuple)) else c)
    return names


def _find(cfg, key):
    """A config field, looked up in the config, then its usual sub-configs, then
    (depth first) any sub-config at all (FLAVA's ``image_config``, T5Gemma 2's
    ``encoder.vision_config``, Granite Speech's ``encoder_config``)."""
    v = getattr(cfg, key, None)
    if v is not None:
        return v
    for k in ("vision_config", "audio_config", "encoder", "backbone_config", "text_config"):
        sub = getattr(cfg, k, None)
        if sub is not None and getattr(sub, key, None) is not None:
            return getattr(sub, key)
    return _find_deep(cfg, key, 0)


def _find_deep(cfg, key, depth):
    from transformers import PretrainedConfig
    if depth > 3:
        return None
    subs = [v for v in vars(cfg).values() if isinstance(v, PretrainedConfig)]
    for sub in subs:
        if getattr(sub, key, None) is not None:
            return getattr(sub, key)
    for sub in subs:
        v = _find_deep(sub, key, depth + 1)
        if v is not None:
            return v
    return None


def input_options(model, cfg, gen) -> list[dict]:
    """Keyword input sets to try, best first (see the module docstring)."""
    import torch

    params = inspect.signature(model.forward).parameters
    vocab = _find(cfg, "vocab_size") or VOCAB
    avoid = special_ids(cfg)
    allowed = torch.tensor([i for i in range(min(vocab, ID_LIMIT)) if i not in avoid] or [0])

    def ids(n):
        return allowed[torch.randint(0, len(allowed), (BATCH, n), generator=gen)]

    mods: dict[str, list[dict]] = {}
    if "input_ids" in params:
        mods["text"] = [{"input_ids": ids(SEQ)}]
        # a second token sequence of a tower of its own (Evolla's protein_input_ids), from
        # that tower's vocabulary, with its mask
        for name in params:
            if name.endswith("_input_ids") and name not in ("input_ids", "decoder_input_ids") \
                    and not (name == "audio_input_ids" and _codebooks(cfg)):
                sub = None
                for k, v in vars(cfg).items():
                    if k.startswith(name[:-len("_input_ids")]) and _is_int(getattr(v, "vocab_size", None)):
                        sub = v.vocab_size
                n = min(sub or VOCAB, ID_LIMIT)
                opt = {name: torch.randint(4, max(n, 5), (BATCH, SEQ), generator=gen)}
                mask = name[:-len("input_ids")] + "attention_mask"
                if mask in params:
                    opt[mask] = torch.ones(BATCH, SEQ, dtype=torch.long)
                mods.setdefault("extra_ids", []).append(opt)
    frames = None
    if "pixel_values" in params:
        img = _find(cfg, "image_size") or 224
        h, w = (img, img) if _is_int(img) else tuple(img)[-2:]
        c = _find(cfg, "num_channels") or 3
        frames = _find(cfg, "num_frames")
        opts = [{"pixel_values": torch.randn(BATCH, c, h, w, generator=gen)}]
        p = _find(cfg, "patch_size")
        p = p[0] if isinstance(p, (list, tuple)) and p else p
        f = _find_int(cfg, SHUFFLE_KEYS)
        if _is_int(p) and _is_int(f) and f > 1 and (h // p) % f:
            # a pixel shuffle / downsampling of the patch grid by f: a grid that f divides
            side = p * f * max(1, -(-h // (p * f)))
            opts.append({"pixel_values": torch.randn(BATCH, c, side, side, generator=gen)})
        for name in params:  # a second image input of a tower of its own (high resolution)
            if name.endswith("_pixel_values") and name != "pixel_values":
                sub = getattr(cfg, name[:-len("pixel_values")] + "vision_config", None)
                side = getattr(sub, "image_size", None)
                if _is_int(side):
                    for o in opts:
                        o[name] = torch.randn(BATCH, c, side, side, generator=gen)
        if "image_grid_thw" in params or "grid_thw" in params:
            # Qwen-VL style: flat patches and each image's grid (``grid_thw``: a vision
            # tower called on its own)
            opts[0:0] = _grid_inputs(cfg, gen, params)
        if _is_int(frames):
            opts.insert(0, {"pixel_values": torch.randn(BATCH, frames, c, h, w, generator=gen)})
        if "spatial_shapes" in params and _is_int(p):
            # SigLIP 2 style (LFM2-VL): patches flattened to (batch, patches, C x P x P), each
            # image's patch grid in spatial_shapes, real patches in pixel_attention_mask; a 4 x 4
            # grid, which a pixel-unshuffle by 2 or 4 divides
            g = 4
            flat = {"pixel_values": torch.randn(BATCH, g * g, c * p * p, generator=gen),
                    "spatial_shapes": torch.tensor([[g, g]] * BATCH)}
            if "pixel_attention_mask" in params:
                flat["pixel_attention_mask"] = torch.ones(BATCH, g * g, dtype=torch.bool)
            opts.insert(0, flat)
        if "target_sizes" in params and _is_int(p):
            # NaViT packing (MiniCPM-V): an image per sample, their 8 x 8 patches side by side
            # in one strip (1, C, P, patches x P), each image's patch grid in target_sizes
            # (8 x 8: merged 16-fold, still placeholders)
            g = 8
            opts.insert(0, {"pixel_values": torch.randn(1, c, p, BATCH * g * g * p, generator=gen),
                            "target_sizes": torch.tensor([[g, g]] * BATCH)})
        if _is_int(p) and any(isinstance(m, torch.nn.Linear) and m.in_features == c * p * p
                              for m in model.modules()):
            # patches flattened to (batch, patches, C x P x P) for a linear patch embedding
            # (Fuyu), tried after whole images
            opts.append({"pixel_values": torch.randn(BATCH, 4, c * p * p, generator=gen)})
        t = _find(cfg, "temporal_patch_size")
        if _is_int(p) and _is_int(t) and "image_grid_thw" not in params:
            # one space-time patch an image, channels last (patches, T, P, P, C): an encoder
            # that folds patches to depth itself (Inkling), tried last
            opts.append({"pixel_values": torch.randn(BATCH, t, p, p, c, generator=gen)})
        mods["vision"] = opts
    audio = []
    if "input_features" in params:
        # the feature width: the first named one, then (Granite Speech: its encoder's
        # input_dim, not num_mel_bins) the others
        mels = [v for v in (_find(cfg, k) for k in ("num_mel_bins", "feature_size",
                                                    "input_feat_per_channel", "input_dim"))
                if _is_int(v)] or [80]
        src, window = _find(cfg, "max_source_positions"), _find(cfg, "n_window")
        t = 2 * src if _is_int(src) else 64
        if _is_int(window):  # encoders that take whole windows of 2 x n_window frames
            t = 2 * window
            if _is_int(src) and src < window:
                # (a window's positions, halved by the stem, within the position table:
                # Qwen2.5-Omni) one window cut to the table
                t = 2 * src
        # a mask of the frames where forward takes one (all frames real)
        mask = next((m for m in AUDIO_MASKS if m in params), None)
        for shape in [s for mel in dict.fromkeys(mels) for s in ((BATCH, mel, t), (BATCH, t, mel))]:
            opt = {"input_features": torch.randn(*shape, generator=gen)}
            if mask:
                opt[mask] = torch.ones(BATCH, t, dtype=torch.long)
            if "chunk_sample_lengths" in params:  # the waveform samples each chunk's frames hold
                hop = _find_int(cfg, ("hop_length",)) or 160
                opt["chunk_sample_lengths"] = torch.full((BATCH,), t * hop, dtype=torch.long)
            audio.append(opt)
    if "audio_input_features" in params and "audio_embed_sizes" in params:
        # Phi-4-multimodal: (batch, frames, mels) features, how many projected features
        # each sample keeps (frames / time_reduction), and the frames' mask
        mel = _find_int(cfg, ("input_size", "num_mel_bins")) or 80
        red = _find_int(cfg, ("time_reduction",)) or 8
        t = 8 * red
        audio.append({"audio_input_features": torch.randn(BATCH, t, mel, generator=gen),
                      "audio_embed_sizes": torch.full((BATCH,), t // red, dtype=torch.long),
                      "audio_attention_mask": torch.ones(BATCH, t, dtype=torch.bool)})
    if "input_values" in params:
        mel = _find(cfg, "num_mel_bins")
        length = _find(cfg, "max_length")
        audio += [{"input_values": torch.randn(BATCH, 4000, generator=gen)}]
        if _is_int(mel):
            audio += [{"input_values": torch.randn(BATCH, length if _is_int(length) else 64, mel,
                                                   generator=gen)}]
        audio += [{"input_values": torch.randn(BATCH, 1, 4000, generator=gen)}]
    if "audio_input_ids" in params and _codebooks(cfg):
        # audio as codes (audios, frames, codebooks): 3 frames an audio
        books, size = _codebooks(cfg)
        audio.append({"audio_input_ids": torch.randint(0, size, (BATCH, 3, books), generator=gen)})
    if audio:
        mods["audio"] = audio
    if "past_values" in params:
        mods["series"] = _series(cfg, params, gen)
    if "states" in params and "returns_to_go" in params:
        # Decision Transformer: a trajectory of (return-to-go, state, action) steps
        steps, state, act = 4, _find_int(cfg, ("state_dim",)) or 4, _find_int(cfg, ("act_dim",)) or 2
        mods["trajectory"] = [{"states": torch.randn(BATCH, steps, state, generator=gen),
                               "actions": torch.randn(BATCH, steps, act, generator=gen),
                               "rewards": torch.randn(BATCH, steps, 1, generator=gen),
                               "returns_to_go": torch.randn(BATCH, steps, 1, generator=gen),
                               "timesteps": torch.arange(steps).expand(BATCH, steps).contiguous(),
                               "attention_mask": torch.ones(BATCH, steps, dtype=torch.long)}]
    if "vision" in mods and "image_sizes" in params:  # each image's (height, width), when needed
        mods["vision"] += [{**opt, "image_sizes": torch.tensor([list(opt["pixel_values"].shape[-2:])]
                                                               * BATCH)}
                           for opt in mods["vision"] if opt["pixel_values"].dim() == 4]
    if "vision" in mods and not _is_int(frames):
        # some take (batch, images or tiles, C, H, W): LLaVA-NeXT one tile and the whole image
        for n in (1, 2):
            for opt in [o for o in mods["vision"] if o["pixel_values"].dim() == 4]:
                mods["vision"].append({k: v.unsqueeze(1).expand(-1, n, -1, -1, -1).contiguous()
                                       if k == "pixel_values" else v for k, v in opt.items()})
    if "vision" in mods and "pixel_attention_mask" in params:
        # which pixels (Idefics: (batch, images, H, W)) or which tiles (Granite Docling:
        # (batch, tiles)) are real: all of them, in either form
        mods["vision"] += [{**opt, "pixel_attention_mask": torch.ones(*shape, dtype=torch.bool)}
                           for opt in list(mods["vision"]) if opt["pixel_values"].dim() == 5
                           for shape in (opt["pixel_values"].shape[:2],
                                         opt["pixel_values"].shape[:2] + opt["pixel_values"].shape[-2:])]
    if "vision" in mods and "pixel_values_videos" in params and "video_grid_thw" not in params:
        # videos as (batch, frames, C, H, W) of the images' size (Video-LLaVA's video tower)
        nf = _find_int(cfg, ("num_frames",)) or 2
        mods["video"] = [{"pixel_values_videos": o["pixel_values"].unsqueeze(1).expand(
            -1, nf, -1, -1, -1).contiguous()} for o in mods["vision"][:1]
            if o["pixel_values"].dim() == 4 and len(o) == 1]
        if not mods["video"]:
            del mods["video"]
    if "hidden_states" in params and "grid_thw" in params and "vision" not in mods:
        # a Qwen-VL-style vision tower called on its own, its patches named hidden_states
        mods["tower"] = _grid_inputs(cfg, gen, params, image="hidden_states")
    if "image_pixel_values" in params and "vision" not in mods:
        # Phi-4-multimodal's HD crops: (batch, 1 global + crops, C, crop, crop), each
        # image's size, and a mask of the patches of each crop; one crop a side
        crop = _find_int(cfg, ("crop_size", "image_size")) or 32
        patch = _find_int(cfg, ("patch_size",)) or 8
        c = _find_int(cfg, ("num_channels",)) or 3
        mods["vision"] = [{"image_pixel_values": torch.randn(BATCH, 2, c, crop, crop, generator=gen),
                           "image_sizes": torch.tensor([[crop, crop]] * BATCH),
                           "image_attention_mask": torch.ones(BATCH, 2, crop // patch, crop // patch,
                                                              dtype=torch.bool)}]
    first = None  # the text set of the first modality that got placeholders
    for mod, getter, token_keys in PLACEHOLDERS:
        # a multimodal LM: input_ids hold one placeholder token per feature of the modality
        tok = _find_int(cfg, token_keys)
        if "text" not in mods or mod not in mods or tok is None or tok >= vocab:
            continue
        for opt in mods[mod]:
            opt = {**opt, **(mods.get("extra_ids") or [{}])[0]}
            n = _features_per_sample(model, getter, opt, flat=mod == "video") or \
                (int(opt["audio_embed_sizes"][0]) if "audio_embed_sizes" in opt else None) or \
                _features_from_error(model, ids, opt, tok)
            if n:
                holders = torch.full((BATCH, n), tok, dtype=torch.long)
                text = {"input_ids": torch.cat([holders, ids(SEQ)], 1), **opt}
                both = None
                if first is not None:
                    # a second modality (video or audio after image): both at once, each
                    # with its placeholders; video only so, audio also alone
                    both = {**first, **opt, "input_ids": torch.cat([holders, first["input_ids"]], 1)}
                    if mod == "video":
                        text, both = both, None
                else:
                    first = text
                if "mm_token_type_ids" in params and mod == "vision":  # 1 marks image tokens
                    text["mm_token_type_ids"] = (text["input_ids"] == tok).long()
                variants = [text]
                start, end = (_find_int(cfg, (f"{w}_{e}_token_id" for w in BOUNDARY[mod]))
                              for e in ("start", "end"))
                if start is not None and end is not None and max(start, end) < vocab:
                    # the placeholders between the modality's start and end tokens, as its
                    # processor writes them (Ovis 2.5 checks they are there)
                    wrap = {**text, "input_ids": torch.cat([torch.full((BATCH, 1), start), holders,
                                                            torch.full((BATCH, 1), end), ids(SEQ)], 1)}
                    if "mm_token_type_ids" in text:
                        wrap["mm_token_type_ids"] = (wrap["input_ids"] == tok).long()
                    variants.append(wrap)
                if "attention_mask" in params:
                    # some merge features only given the text's mask (Qwen2-Audio): the same
                    # set with an all-ones mask, tried after the set without one
                    variants.append({**text, "attention_mask": torch.ones_like(text["input_ids"])})
                for m in AUDIO_MASKS:
                    if m in text and text[m].shape[-1] != n:
                        # a mask of the projected features, not of the frames (Granite Speech)
                        variants.append({**text, m: torch.ones(BATCH, n, dtype=torch.bool)})
                if both is not None:
                    variants[0:0] = [both] + ([{**both, "attention_mask": torch.ones_like(
                        both["input_ids"])}] if "attention_mask" in params else [])
                mods["text"][0:0] = variants
                break
    extra = {}
    if "decoder_input_ids" in params:
        extra["decoder_input_ids"] = ids(DEC_SEQ)
    main = getattr(model, "main_input_name", None)
    main_mod = next((m for m, opts in mods.items() if main in opts[0]), None)
    sets: list[dict] = []
    if len(mods) > 1:  # every modality at once, main input's shapes first
        import itertools
        for combo in itertools.product(*mods.values()):
            d = {}
            # the text part last: a text set with placeholders carries the modality input it
            # was counted for (and that input's masks), which must not be replaced
            for part in combo[1:] + combo[:1] if "text" in mods else combo:
                d.update(part)
            if not any(d.keys() == o.keys() and all(d[k] is o[k] for k in d) for o in sets):
                sets.append(d)
    order = ([main_mod] if main_mod else []) + [m for m in mods if m != main_mod]
    for m in order:
        sets += mods[m]
    out = []
    for s in sets:
        s = {**s, **extra}
        if "entity_ids" in params and "input_ids" in s:  # LUKE: two entities, each spanning a token
            s.update(_entities(cfg, gen))
        dim = _find_int(cfg, ("visual_embedding_dim",))
        if "visual_embeds" in params and "input_ids" in s and dim:  # VisualBERT: region features
            s.update(visual_embeds=torch.randn(BATCH, 3, dim, generator=gen),
                     visual_attention_mask=torch.ones(BATCH, 3, dtype=torch.long),
                     visual_token_type_ids=torch.ones(BATCH, 3, dtype=torch.long))
        if "bbox" in params and "input_ids" in s:  # layout models: one (empty) box per token
            s["bbox"] = torch.zeros(*s["input_ids"].shape, 4, dtype=torch.long)
        out.append(s)
    return out


def _series(cfg, params, gen) -> list[dict]:
    """Time-series inputs: ``past_values`` of (batch, length, channels) or (batch, length),
    the length the config's context (with its lags) or a few of its patches, every step
    observed, and the time features, padding and frequency forward takes; where it
    takes the known future (``future_values``, for an encoder-decoder), also with it."""
    import torch
    patch = _find_int(cfg, ("patch_length", "patch_len")) or 1
    context = _find_int(cfg, ("context_length",)) or 4 * patch
    if context > POSITIONS:  # TimesFM: a context of 512 or 16384 steps, 32 a patch
        context = 2 * patch
    lags = _find(cfg, "lags_sequence")
    length = context + (max(lags) if isinstance(lags, (list, tuple)) and lags else 0)
    channels = _find_int(cfg, ("num_input_channels", "input_size")) or 1
    shapes = [(BATCH, length, channels)] + ([(BATCH, length)] if channels == 1 else [])
    out = []
    for shape in shapes:
        o = {"past_values": torch.randn(*shape, generator=gen)}
        if "past_time_features" in params:
            o["past_time_features"] = torch.randn(BATCH, length, max(1, _find_int(
                cfg, ("num_time_features",)) or 0), generator=gen)
        if "past_observed_mask" in params:
            o["past_observed_mask"] = torch.ones(*shape)
        if "past_values_padding" in params:
            o["past_values_padding"] = torch.zeros(BATCH, length)
        if "freq" in params:
            o["freq"] = torch.zeros(BATCH, 1, dtype=torch.long)
        horizon = _find_int(cfg, ("prediction_length",))
        if "future_values" in params and horizon and "past_time_features" in o:
            # the known future too (Informer, Autoformer): its decoder runs on it
            out.append({**o, "future_values": torch.randn(BATCH, horizon, *shape[2:], generator=gen),
                        "future_time_features": torch.randn(
                            BATCH, horizon, o["past_time_features"].shape[-1], generator=gen)})
        out.append(o)
    return out


def _codebooks(cfg) -> tuple[int, int] | None:
    """(codebooks, codes a codebook) of audio given as discrete codes, one per
    codebook a frame (Inkling: ``n_mel_bins`` of ``mel_vocab_size``), or None
    where the config names no codebooks."""
    books = _find_int(cfg, ("num_codebooks", "n_mel_bins"))
    size = _find_int(cfg, ("codebook_size", "mel_vocab_size"))
    return None if books is None or size is None else (books, size)


def _entities(cfg, gen) -> dict:
    """Entity inputs of an entity-aware LM (LUKE): two entity ids per sample, each
    mentioned by one word (positions 1 and 2; the rest of each mention padded with -1)."""
    import torch
    vocab = _find_int(cfg, ("entity_vocab_size",)) or 2
    span = _find_int(cfg, ("max_mention_length",)) or 1
    positions = torch.full((BATCH, 2, span), -1, dtype=torch.long)
    positions[:, 0, 0], positions[:, 1, 0] = 1, 2
    return {"entity_ids": torch.randint(1, max(vocab, 2), (BATCH, 2), generator=gen),
            "entity_attention_mask": torch.ones(BATCH, 2, dtype=torch.long),
            "entity_position_ids": positions}


#: the words of a modality's start / end token ids (``image_start_token_id``)
BOUNDARY = {"vision": ("image", "vision", "vis"), "video": ("video",), "audio": ("audio",)}

#: forward's names of a mask over the audio frames
AUDIO_MASKS = ("input_features_mask", "feature_attention_mask", "input_features_attention_mask")

#: config keys of a factor the patch grid is divided by (pixel shuffle, downsampling)
SHUFFLE_KEYS = ("pixel_shuffle_factor", "scale_factor", "downsample_factor", "pixel_shuffle_ratio")

#: (modality, the model's feature getter, config keys of its placeholder token)
PLACEHOLDERS = (("vision", "get_image_features", ("image_token_id", "image_token_index")),
                ("video", "get_video_features", ("video_token_id", "video_token_index")),
                ("audio", "get_audio_features", ("audio_token_id", "audio_token_index")))


def _patch_grid(cfg, gen) -> dict:
    """Qwen-VL style image inputs: each image a (1, h, w) grid of patches
    (h = w = twice the spatial merge), flattened to (patches, C x T x P x P),
    with ``image_grid_thw``."""
    import torch

    def size(key, default):
        v = _find(cfg, key)
        v = v[0] if isinstance(v, (list, tuple)) and v else v
        return v if _is_int(v) else default
    merge, p = size("spatial_merge_size", 1), size("patch_size", 14)
    t, c = size("temporal_patch_size", 1), size("in_channels", None) or size("num_channels", 3)
    side = 2 * merge
    return {"pixel_values": torch.randn(BATCH * side * side, c * t * p * p, generator=gen),
            "image_grid_thw": torch.tensor([[1, side, side]] * BATCH)}


def _patch_grids(cfg, gen) -> list[dict]:
    """:func:`_patch_grid`, and when the config names no temporal patch size, the same
    with Qwen-VL's default of 2 frames a patch (MUSE Glimmer's tower takes 2 without
    saying so)."""
    opts = [_patch_grid(cfg, gen)]
    if _find(cfg, "temporal_patch_size") is None:
        o = _patch_grid(cfg, gen)
        o["pixel_values"] = torch_cat_twice(o["pixel_values"])
        opts.append(o)
    return opts


def _grid_inputs(cfg, gen, params, image: str = "pixel_values") -> list[dict]:
    """:func:`_patch_grids` under the names ``forward`` takes: the patches as ``image``,
    the grids as ``image_grid_thw`` (a VLM) or ``grid_thw`` (its tower alone), each
    image's merge size where it takes that too."""
    import torch
    grid = "image_grid_thw" if "image_grid_thw" in params else "grid_thw"
    merges = next((k for k in ("image_merge_sizes", "merge_sizes") if k in params), None)
    p = _find(cfg, "patch_size")
    p = p[0] if isinstance(p, (list, tuple)) and p else p
    out = []
    for flat in _patch_grids(cfg, gen):
        x = flat["pixel_values"]
        # the flat patches, then (a conv patch embedding: Kimi K2.5) as (patches, C, P, P)
        shapes = [x] + ([x.view(len(x), -1, p, p)] if _is_int(p) and x.shape[1] % (p * p) == 0 else [])
        for x in shapes:
            o = {image: x, grid: flat["image_grid_thw"]}
            if merges:
                o[merges] = torch.full((BATCH,), _find(cfg, "spatial_merge_size") or 1,
                                       dtype=torch.long)
            out.append(o)
    return out


def torch_cat_twice(x):
    import torch
    return torch.cat([x, x.flip(-1)], -1)


def _find_int(cfg, keys) -> int | None:
    for key in keys:
        v = _find(cfg, key)
        if _is_int(v):
            return v
    return None


def _features_per_sample(model, getter: str, inputs: dict, flat: bool = False) -> int | None:
    """How many placeholder tokens one sample's modality input becomes (the
    projected features ``getter`` returns, given the inputs it takes), or None."""
    import torch
    # the head's, else its base model's (some heads do not forward the getter)
    fn = getattr(model, getter, None) or getattr(getattr(model, "model", None), getter, None)
    if fn is None:
        return None
    takes = inspect.signature(fn).parameters
    # the inputs it names, then (a getter that passes **kwargs on) all of them
    tries = [{k: v for k, v in inputs.items() if k in takes}]
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in takes.values()):
        tries.append(dict(inputs))
    f = None
    for kw in tries:
        try:
            with torch.no_grad():
                f = fn(**kw)
            break
        except Exception:  # noqa: BLE001 - needs more than these inputs
            continue
    if not isinstance(f, (torch.Tensor, list, tuple)):
        # the projected features, else (a getter that projects in place: Fuyu) the last state
        f = getattr(f, "pooler_output", None) if getattr(f, "pooler_output", None) is not None \
            else getattr(f, "last_hidden_state", None)
    if isinstance(f, torch.Tensor):
        if f.dim() == 3 and f.shape[0] == BATCH:
            return f.shape[1]
        if flat and f.dim() == 3 and f.shape[0] % BATCH == 0:  # a video: (batch x frames, tokens, d)
            return f.shape[0] // BATCH * f.shape[1]
        if f.dim() == 2 and f.shape[0] % BATCH == 0:
            return f.shape[0] // BATCH
    if isinstance(f, (list, tuple)) and len(f) == BATCH and all(
            isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[0] == f[0].shape[0] for t in f):
        return f[0].shape[0]
    return None


def _features_in(message: str, tokens: int | None = None) -> int | None:
    """How many features a model's complaint about its placeholders names, given
    ``tokens`` placeholders (any number when None): "tokens: 2, features: 8", or
    index_put's "value tensor of shape [8, d] cannot be broadcast to indexing
    result of shape [2, d]"."""
    t = r"\d+" if tokens is None else str(tokens)
    m = re.search(rf"tokens:? *{t}\b.*?features:? *(\d+)", message, re.S | re.I) or \
        re.search(rf"value tensor of shape \[(\d+), \d+\] cannot be broadcast to "
                  rf"indexing result of shape \[{t}, ", message)
    return int(m.group(1)) if m else None


def _features_from_error(model, ids, inputs: dict, tok: int) -> int | None:
    """Placeholder tokens per sample, read from the model's own complaint when it is
    run with none, or with two per sample ("tokens: 0, features: 32"): for models
    without a usable getter (two in a row: Qwen2-Audio takes a lone placeholder for
    an unexpanded prompt and merges otherwise)."""
    import torch
    for k in (0, 2):
        input_ids = torch.cat([torch.full((BATCH, k), tok, dtype=torch.long), ids(SEQ)], 1)
        for mask in ({}, {"attention_mask": torch.ones_like(input_ids)}):
            try:
                _run(model, {"input_ids": input_ids, **inputs, **mask})
            except Exception as e:  # noqa: BLE001 - the message is what we want
                n = _features_in(str(e), BATCH * k)
                if n and n % BATCH == 0:
                    return n // BATCH
                continue
            break
    return None


def _run(model, inputs: dict):
    import torch
    from autobasin.inputs import as_inputs
    with torch.no_grad():
        return as_inputs(inputs, model).call(model)


def _count_meta(cls, cfg) -> int | None:
    import torch
    try:
        with torch.device("meta"):
            m = cls._from_config(cfg)
        return sum(p.numel() for p in m.parameters())
    except Exception:  # noqa: BLE001 - cannot build on meta: build for real
        return None


def build(model_type: str, base: bool):
    """(model, inputs, info) for the first level / class / attention
    implementation / input set that builds and runs; raises the first error
    otherwise."""
    import torch
    import transformers
    from transformers import CONFIG_MAPPING

    cfg_cls = CONFIG_MAPPING[model_type]
    default = cfg_cls()
    classes = model_classes(model_type, base)
    errors: list[tuple[int, str]] = []  # (how far it got: 0 config .. 3 forward, message)
    for label, generic, image, widths, kv_heads in LEVELS:
        kw = shrink_kwargs(default, generic, image, widths, kv_heads=kv_heads)
        override, _why = OVERRIDES.get(model_type, ({}, ""))
        if widths is not None:  # nested configs (vision_config) are merged, not replaced
            kw = _merge(kw, override)
        try:
            cfg = cfg_cls(**kw)
        except Exception as e:  # noqa: BLE001
            errors.append((0, f"{label} config: {first_line(e)}"))
            continue
        for cname in classes:
            cls = getattr(transformers, cname, None)
            if cls is None:
                errors.append((0, f"{cname}: not exported by transformers"))
                continue
            n = _count_meta(cls, cfg)
            if n is None and widths is not True:
                # not buildable on meta, at a size that may be large: not built for real
                errors.append((-1, f"{label} {cname}: does not build on the meta device"))
                continue
            if n is not None and n > MAX_PARAMS:
                errors.append((-1, f"{label} {cname}: {n / 1e6:.0f}M parameters"))
                continue
            for attn in ("sdpa", "eager"):
                torch.manual_seed(0)
                try:
                    model = cls._from_config(cfg, attn_implementation=attn).eval()
                except Exception as e:  # noqa: BLE001
                    supported = "does not support an attention implementation" not in str(e)
                    errors.append((1 if supported else 0, f"{label} {cname} {attn}: {first_line(e)}"))
                    continue
                gen = torch.Generator().manual_seed(0)
                options = input_options(model, cfg, gen)
                if not options:
                    takes = ", ".join(inspect.signature(model.forward).parameters)
                    errors.append((2, f"{label} {cname}: no input set for forward({takes})"))
                for inputs in options:
                    try:
                        out = _run(model, inputs)
                    except Exception as e:  # noqa: BLE001
                        errors.append((3, f"{label} {cname} {attn} {sorted(inputs)}: "
                                          f"{first_line(e)}"))
                        continue
                    keys = list(out.keys()) if hasattr(out, "keys") else []
                    info = {"level": label, "attn": attn, "cls": cname,
                            # a head: the type's head class, or a base class that returns
                            # logits itself (Llama 4, Parakeet CTC)
                            "head": cname != classes[-1] or "logits" in keys,
                            "output_keys": keys, "inputs": sorted(inputs),
                            "input_shapes": {k: list(v.shape) for k, v in inputs.items()}}
                    return model, inputs, info
                break  # built but no input set runs: eager will not help
    # the error of the try that got furthest (the first such)
    stage = max((s for s, _ in errors), default=0)
    first = next((m for s, m in errors if s == stage), "?")
    raise RuntimeError(f"no tiny config builds and runs ({len(errors)} tries); furthest: {first}")


# Inputs that switch forward to a path one call cannot take together with the
# other (Granite-Docling's fine connector beside its coarse one), or that only an
# optional input reaches (Longformer's global attention, SAM 3's box prompts):
# the same inputs with them added are a further input set (``infer_spec(...,
# more_inputs=...)``), so both paths' weights are aligned and checked. Each entry:
# a forward parameter that switches the path on, and what to add for it.
def _all_samples_on(inputs: dict):
    """A per-sample flag, on for every sample (the batch of ``input_ids``, else of
    the first tensor input)."""
    import torch
    return torch.ones(_first(inputs).shape[0], dtype=torch.bool)


def _first(inputs: dict):
    first = inputs.get("input_ids")
    return first if first is not None else next(v for v in inputs.values() if hasattr(v, "shape"))


def _global_first_token(inputs: dict) -> dict:
    """Longformer / LED: the first token of every sample attends globally (as a
    classification token does), the rest locally."""
    import torch
    ids = inputs.get("input_ids")
    if ids is None:
        return {}
    mask = torch.zeros_like(ids)
    mask[:, 0] = 1
    return {"global_attention_mask": mask}


def _one_box(inputs: dict) -> dict:
    """A box prompt per image (SAM 3's geometry encoder): one positive box,
    normalised (cx, cy, w, h), with its label."""
    import torch
    n = _first(inputs).shape[0]
    return {"input_boxes": torch.tensor([[[0.5, 0.5, 0.4, 0.3]]] * n),
            "input_boxes_labels": torch.ones(n, 1, dtype=torch.long)}


MODE_INPUTS = {"tile_fine_mask": lambda inputs: {"tile_fine_mask": _all_samples_on(inputs)},
               "fine": lambda inputs: {"fine": True},
               "global_attention_mask": _global_first_token,
               "input_boxes": _one_box}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k] is b[k] or (
        hasattr(a[k], "shape") and hasattr(b[k], "shape") and a[k].shape == b[k].shape
        and bool((a[k] == b[k]).all())) for k in a)


def _owners(model) -> dict:
    """The modules that own parameters themselves, by name."""
    return {n: m for n, m in model.named_modules()
            if next(m.parameters(recurse=False), None) is not None}


def _used_modules(model, inputs: dict) -> set[str]:
    """Names of the modules owning parameters that a forward on ``inputs`` calls."""
    import torch
    owners = _owners(model)
    called: set[str] = set()
    hooks = [m.register_forward_pre_hook(lambda mod, _, n=n: called.add(n))
             for n, m in owners.items()]
    try:
        with torch.no_grad():
            _run(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    return called


def reach_inputs(model, inputs: dict, limit: int = 2, scan: int = 12) -> list[dict]:
    """Further input sets, among the first ``scan`` of :func:`input_options`, that
    run modules ``inputs`` leaves unused (Phi-4-multimodal projects audio one way
    alone and another way beside images): at most ``limit``, each reaching some
    module none before it reached."""
    import torch
    try:
        unused = set(_owners(model)) - _used_modules(model, inputs)
    except Exception:  # noqa: BLE001 - hooks cannot watch this model: none
        return []
    out: list[dict] = []
    options = input_options(model, model.config, torch.Generator().manual_seed(0))[:scan]
    for opt in options:
        if not unused or len(out) >= limit:
            break
        if _same(opt, inputs):
            continue
        try:
            reached = _used_modules(model, opt) & unused
        except Exception:  # noqa: BLE001 - this set does not run
            continue
        if reached:
            out.append(opt)
            unused -= reached
    return out


def mode_inputs(model, inputs: dict) -> list[dict]:
    """``inputs`` with each mode input forward takes added (:data:`MODE_INPUTS`),
    where that runs;
    with as many image placeholders as the other path yields, where the model
    says so (:func:`_features_in`)."""
    import torch
    params = inspect.signature(model.forward).parameters
    out = []
    for flag, value in MODE_INPUTS.items():
        if flag not in params or flag in inputs:
            continue
        add = value(inputs)
        if not add or not set(add) <= set(params):
            continue
        more = {**inputs, **add}
        try:
            _run(model, more)
        except Exception as e:  # noqa: BLE001 - maybe the placeholder count, else skip
            tok = _find_int(model.config, PLACEHOLDERS[0][2])
            n = _features_in(str(e))
            ids = more.get("input_ids")
            if n is None or tok is None or ids is None or n % BATCH:
                continue
            text = ids[:, ids[0] != tok]
            holders = torch.full((BATCH, n // BATCH), tok, dtype=ids.dtype)
            more["input_ids"] = torch.cat([holders, text], 1)
            if "attention_mask" in more:
                more["attention_mask"] = torch.ones_like(more["input_ids"])
            try:
                _run(model, more)
            except Exception:  # noqa: BLE001 - the flag does not apply to these inputs
                continue
        out.append(more)
    return out


# ------------------------------------------------------------ spec analysis
def _param_name(entry: str) -> tuple[str, int | None]:
    """'a.b.weight[0@0:4x4.d1]' -> ('a.b.weight', 0)."""
    name, _, rest = entry.partition("[")
    m = re.match(r"(\d+)", rest)
    return name, int(m.group(1)) if m else None


def residual_probe(model, inputs: dict) -> tuple[str | None, int | None]:
    """(state_dict name, axis) of the model's first hidden axis: the word
    embedding's columns, else the output channels of the first Conv/Linear the
    forward calls."""
    import torch
    names = {}
    for n, t in model.state_dict(keep_vars=True).items():
        names.setdefault(id(t), n)
    if "input_ids" in inputs:
        try:
            emb = model.get_input_embeddings()
        except Exception:  # noqa: BLE001
            emb = None
        w = getattr(emb, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 2 and id(w) in names:
            return names[id(w)], 1
    kinds = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)
    layers = [m for m in model.modules() if isinstance(m, kinds) and id(m.weight) in names]
    # the first one the forward calls (registration order may put a head first)
    called = []
    hooks = [m.register_forward_pre_hook(lambda m, _: called.append(m)) for m in layers]
    try:
        with torch.no_grad():
            model(**inputs)
    except Exception:  # noqa: BLE001 - registration order then
        called = []
    finally:
        for h in hooks:
            h.remove()
    for m in called + layers:
        return names[id(m.weight)], 0
    return None, None


def residual_status(spec, tensor: str | None, axis: int | None) -> tuple[bool | None, str]:
    """Whether a group acts on (tensor, axis), and if not, why."""
    if tensor is None:
        return None, "no embedding or Conv/Linear found"
    for g in spec.groups.values():
        for m in g.members:
            if m.param == tensor and m.axis == axis:
                return True, ""
    for entry, reason in spec.fixed_axes():
        n, a = _param_name(entry)
        if n == tensor and a == axis:
            return False, reason
    try:
        kind = spec.axis_kinds(tensor)[axis]
    except Exception:  # noqa: BLE001
        kind = "?"
    return False, f"{tensor}[{axis}] is {kind}"


# =============================================================== worker side
def worker(model_type: str, base: bool, result_path: str, threads: int) -> None:
    import transformers
    transformers.logging.set_verbosity_error()

    def create(row):
        model, inputs, info = build(model_type, base)
        row.update(info)
        row["residual_tensor"], row["residual_axis"] = residual_probe(model, inputs)
        row["outputs"] = ["logits"] if info["head"] and "logits" in info["output_keys"] else None
        more = mode_inputs(model, inputs)
        more += [m for m in reach_inputs(model, inputs) if not any(_same(m, o) for o in more)]
        row["more_inputs"] = [sorted(m) for m in more]
        return model, inputs, more

    def describe(spec, row):
        row["capture"] = spec.capture or "?"
        row["residual"], row["residual_why"] = residual_status(
            spec, row["residual_tensor"], row["residual_axis"])
        row["short"] = spec.fixed_reasons(3)
        row["blocked_ops"] = [[str(n), str(r)[:300]] for n, r in spec.blocked_ops()[:5]]
        row["n_fixed"] = len(spec.fixed_axes())
        row["coverage_arch"] = architectural_coverage(spec)

    work(result_path, threads, create, describe, SEEDS, RTOL, limit=500)


# =============================================================== parent side
_CTX = None
WORKER_RUN_NAME = "__zoo_hf_worker__"


def _context():
    """A forkserver that has imported torch, transformers and autobasin once:
    each type still runs in a process of its own, without paying the imports."""
    global _CTX
    if _CTX is None:
        import multiprocessing as mp
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["torch", "torch.export", "transformers",
                                     "transformers.modeling_utils", "transformers.generation",
                                     "autobasin",
                                     "autobasin.infer", "autobasin.permute", "autobasin.testing"])
    return _CTX


def _worker_entry(model_type: str, base: bool, result_path: str, threads: int) -> None:
    try:
        worker(model_type, base, result_path, threads)
    except BaseException:  # noqa: BLE001 - leave the traceback for the parent
        Path(result_path + ".log").write_text(traceback.format_exc())
        raise


def run_one(entry: dict, base: bool, timeout: float, mem_bytes: int, threads: int) -> dict:
    """Run the worker for one type in a process of its own; always returns a row."""
    row = dict(entry)
    fd, path = tempfile.mkstemp(prefix="zoo_hf_", suffix=".json")
    os.close(fd)
    t0 = time.monotonic()
    # the child runs this file (whether it was run as a script or imported)
    # with the arguments below, see the end of the file
    import runpy
    proc = _context().Process(target=runpy.run_path, args=(str(HERE),), kwargs=dict(
        run_name=WORKER_RUN_NAME, init_globals={"WORKER_ARGS": (entry["type"], base, path, threads)}),
        daemon=True)
    proc.start()

    def kill():
        proc.kill()
        proc.join()
    killed, peak = watch(proc.pid, proc.is_alive, kill, timeout, mem_bytes)
    proc.join()
    wall = time.monotonic() - t0
    try:
        res = json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        res = {}
    try:
        log = Path(path + ".log").read_text()
    except OSError:
        log = ""
    for f in (path, path + ".log"):
        try:
            os.unlink(f)
        except OSError:
            pass
    row["built"] = res.get("phase", "start") in ("infer", "check", "done")
    return finish_row(row, res, killed, timeout, mem_bytes, proc.exitcode, log, wall, peak)


def all_types() -> list[dict]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES
    out = []
    for t in sorted(MODEL_MAPPING_NAMES):
        c = MODEL_MAPPING_NAMES[t]
        out.append({"type": t, "base_class": c[0] if isinstance(c, (list, tuple)) else c,
                    "config_class": CONFIG_MAPPING_NAMES.get(t)})
    return out


# ------------------------------------------------------------------- report
def on_target(r: dict) -> bool:
    """Exact, coverage >= TARGET_COVERAGE, and, for a model built with a head,
    the residual stream permuted. A model without a head outputs its residual
    stream (``last_hidden_state``, a dual encoder's embeddings): no spec may
    permute it, so that part does not apply."""
    return (r["status"] == "exact" and isinstance(r.get("coverage"), (int, float))
            and r["coverage"] >= TARGET_COVERAGE
            and (r.get("residual") is True or not r.get("head")))


def _why(r: dict) -> str:
    if r["status"] != "exact":
        return r.get("message", "") or ""
    parts = []
    if r.get("residual") is False and r.get("head"):
        parts.append(f"residual stream fixed: {r.get('residual_why', '')}")
    elif r.get("residual") is None:
        parts.append(f"no residual probe: {r.get('residual_why', '')}")
    if isinstance(r.get("coverage"), float) and r["coverage"] < TARGET_COVERAGE or \
            (r.get("residual") is not True and r.get("head")):
        parts += [f"{why} ({f:.1%} of params)" for why, f in r.get("short", [])[:2]]
        if not r.get("short") and r.get("blocked_ops"):
            parts += [f"{n}: {why}" for n, why in r["blocked_ops"][:2]]
    return "; ".join(parts)


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").replace("`", "'")


def category(message: str) -> str:
    """A failure message with the parts that name one model made generic:
    module paths, numbers, shapes, quoted names."""
    s = message
    s = re.sub(r"'[^']*'", "'…'", s)
    s = re.sub(r'"[^"]*"', '"…"', s)
    s = re.sub(r"\b[A-Za-z_][\w]*(\.[\w]+)+\b", "<name>", s)
    s = re.sub(r"\b[A-Z]\w*(Model|For\w+|Config|Layer|Block|Attention|Encoder|Decoder)\b",
               "<Class>", s)
    s = re.sub(r"\d+(\.\d+)?(e-?\d+)?", "N", s)
    s = re.sub(r"\s+", " ", s).strip()
    return s[:220]


# What holds back the types off target that their architecture alone does not,
# read in transformers' code by hand (the sweep cannot see it): printed under the
# failure categories.
SHORT_CAUSES = {
    "glm_image": "its images enter as VQ codebook ids (an argmin over the codebook), on which "
                 "forward then branches (3-D RoPE positions read from the ids): a graph of image "
                 "inputs depends on the weights and is refused, so with text alone its vision "
                 "tower and VQ model stay unused",
    "udop": "UdopForConditionalGeneration never passes pixel_values or boxes to its decoder: the "
            "decoder's own patch embedding and 2-D relative biases (10% of the parameters) are "
            "used by no input",
    "wav2vec2-conformer": "its encoder builds pos_conv_embed (18% of the parameters) but its "
                          "forward never calls it; its sinusoidal position table is not in the "
                          "state_dict",
    "deepseek_v4": "its hash-routed layers read expert ids from a checkpoint table (tid2eid): "
                   "permuting experts would relabel the table's values, which a spec does not "
                   "express; its compression RoPE frequencies are outside the state_dict",
    "dbrx": "its experts loop over the experts the router picked (`nonzero` of the routing "
            "mask, one weight slice an expert): torch.export cannot capture that for every "
            "input, and the graph of the example's branches is refused because the branches "
            "follow values computed from the weights",
    "kimi_k25": "its vision tower adds a time-position table outside the state_dict to its stream "
                "(which therefore has no permutation), and its projector pools the frames of each "
                "merged patch by index_add: the merge kernel's positions are no symmetry",
    "kosmos-2.5": "its text decoder adds a sinusoidal table outside the state_dict to the "
                  "residual stream, which therefore has no permutation; its image path takes "
                  "flattened patches the sweep does not build",
    "fastspeech2_conformer": "in eval mode its length regulator repeats each phoneme by the "
                             "durations the model predicts: the graph's shapes depend on the "
                             "weights, and capture is refused",
}


# Reasons that fix an axis because of the architecture itself, not for want of a
# rule: a tensor the checkpoint does not hold (a non-persistent buffer: a position
# table, RoPE frequencies), one forward computes from nothing (a sinusoid from
# arange, noise), or a transform that mixes the positions of a hidden axis (FNet's
# Fourier transform). No permutation a checkpoint can carry exists there.
ARCHITECTURAL = re.compile(r"is not in the state_dict|creates a tensor|mixes positions")


def architectural_coverage(spec) -> float:
    """``spec.coverage()`` with the whole axes fixed for an :data:`ARCHITECTURAL`
    reason counted as structural (not hidden): how much of the symmetry that
    exists the spec found."""
    return spec.coverage(not_hidden=lambda why: bool(ARCHITECTURAL.search(why)))


def architectural(r: dict) -> bool:
    """An exact row off target that would be on target if the axes its
    architecture fixes (:data:`ARCHITECTURAL`) counted as structural: its
    coverage of the symmetry that exists is >= the target, and its residual
    stream is permuted or fixed for such a reason."""
    if r["status"] != "exact" or on_target(r) or not isinstance(r.get("coverage_arch"), float):
        return False
    stream = r.get("residual") is True or not r.get("head") or \
        bool(ARCHITECTURAL.search(r.get("residual_why") or ""))
    return r["coverage_arch"] >= TARGET_COVERAGE and stream


def stats(rows: list[dict]) -> dict:
    by_status: dict[str, int] = {}
    for r in rows:
        by_status[r["status"]] = by_status.get(r["status"], 0) + 1
    built = [r for r in rows if r.get("built")]
    exact = [r for r in rows if r["status"] == "exact"]
    target = [r for r in built if on_target(r)]
    arch = [r["type"] for r in built if architectural(r)]
    return {"tried": len(rows), "built": len(built), "exact": len(exact), "architectural": arch,
            "on_target": len(target),
            "on_target_share": len(target) / len(built) if built else None,
            "exact_residual": sum(1 for r in exact if r.get("residual") is True),
            "head_exact": sum(1 for r in exact if r.get("head")),
            "head_residual": sum(1 for r in exact if r.get("head") and r.get("residual") is True),
            "exact_cov": sum(1 for r in exact if (r.get("coverage") or 0) >= TARGET_COVERAGE),
            "caught": by_status.get("caught", 0), "by_status": by_status,
            "capture": {c: sum(1 for r in built if r.get("capture") == c)
                        for c in sorted({r.get("capture") for r in built if r.get("capture")})}}


def write_report(rows: list[dict], out: Path, stem: str, argv: list[str], elapsed: float,
                 jobs: int, base_meta: dict | None = None) -> dict:
    import torch
    import transformers

    rows = sorted(rows, key=lambda r: r["type"])
    st = stats(rows)
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    cmd = "python benchmarks/zoo_hf.py" + (" " + shlex.join(argv) if argv else "")
    reruns = []
    if base_meta is not None:
        again = sorted(r["type"] for r in rows if r.get("rerun"))
        reruns = base_meta.get("reruns", []) + (
            [{"command": cmd, "date": date, "types": again}] if again else [])
        cmd, date = base_meta["command"], base_meta["date"]
        elapsed, jobs = base_meta.get("elapsed_min", float("nan")) * 60, base_meta.get("jobs", jobs)
    share = st["on_target_share"]

    def num(x, fmt):
        return format(x, fmt) if isinstance(x, (int, float)) and not isinstance(x, bool) else ""

    lines = ["# Hugging Face transformers zoo: inferred permutation specs", ""]
    if stem != "zoo_hf":
        lines += ["**Partial run** (not the published sweep).", ""]
    lines += [
        "Every model type of transformers' auto mapping that has a base model class, built from "
        "a tiny config (nothing downloaded) with random weights and every parameter and buffer "
        "made non-trivial: infer the spec (`capture=\"auto\"`), then permute every group at "
        f"random (seeds {', '.join(map(str, SEEDS))}) and compare the outputs (relative L2 <= "
        f"{RTOL:g}, float32, eval mode). A type is built with transformers' own head when it has "
        "one (the base model's output is its residual stream, which no spec may permute; behind "
        "a head it is hidden), and the spec is told the head's `logits` define the model. "
        "How configs are shrunk, which head and which inputs: see the docstring of "
        "`benchmarks/zoo_hf.py`.",
        "",
        "## Summary",
        "",
        f"- model types tried: **{st['tried']}**; built and ran at a tiny size: **{st['built']}**",
        f"- exact: **{st['exact']}**; exact with coverage >= {TARGET_COVERAGE}: {st['exact_cov']}; "
        f"exact with the residual stream permuted: {st['exact_residual']}",
        f"- with a head: {st['head_residual']} / {st['head_exact']} exact types permute the "
        "residual stream; without one the stream is an output (no spec may permute it)",
        f"- **target — exact, coverage >= {TARGET_COVERAGE} and (with a head) residual stream permuted: "
        f"{st['on_target']} / {st['built']} built types"
        + (f" = {share:.1%}" if share is not None else "")
        + f"** (goal >= {TARGET_SHARE:.0%})",
        f"- of the types off target, {len(st['architectural'])} are held back by their "
        "architecture alone: counting as structural the axes fixed by a tensor the checkpoint "
        "does not hold (a sinusoidal position table or RoPE frequencies in a non-persistent "
        "buffer), one forward computes from nothing (a sinusoid from `arange`), or a transform "
        "that mixes a hidden axis's positions (FNet's Fourier transform) — no permutation a "
        "checkpoint can carry exists there, and the spec rightly fixes them — they would be on "
        "target (" + ", ".join(f"`{t}`" for t in st["architectural"]) + "); on target among "
        f"the other built types: {st['on_target']} / {st['built'] - len(st['architectural'])}"
        + (f" = {st['on_target'] / (st['built'] - len(st['architectural'])):.1%}"
           if st["built"] > len(st["architectural"]) else ""),
        f"- **wrong specs caught by the equivalence check (would have shipped silently wrong): "
        f"{st['caught']}**" + (" — must be zero" if st["caught"] else ""),
        "- status: " + ", ".join(f"{k} {v}" for k, v in sorted(st["by_status"].items())),
        "- front end of the built types' specs: "
        + (", ".join(f"{k} {v}" for k, v in st["capture"].items()) or "none"),
        "",
        "Produced by:",
        "",
        "```",
        cmd,
        "```",
        "",
        *[f"Rows re-run since, with `{r['command']}` ({r['date']}): "
          + ", ".join(f"`{t}`" for t in r["types"]) + "." for r in reruns],
        *([""] if reruns else []),
        f"{date}; transformers {transformers.__version__}, torch {torch.__version__}, Python "
        f"{platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"{jobs} parallel job(s); sweep took {elapsed / 60:.1f} min.",
        "",
        "Status: `exact` every check passed; `caught` a random permutation changed the outputs "
        "(or the spec did not fit the state_dict); `check-error` the check failed otherwise; "
        "`trace-error` inference raised; `create-error` no tiny config of the type builds and "
        "runs offline; `timeout`; `crash` the worker died or ran out of memory. Columns: "
        "`level` the config level that built (`tiny`, `tiny-mha`: as many key-value heads as "
        "heads, `tiny-named`: no generic shrinking of unnamed sizes, `tiny-img64`, `shallow`: "
        "depth only, `default`), `attn` the attention "
        "implementation, `front end` the capture that produced the spec (fx / export), "
        "`coverage` the share of hidden parameter axes permuted (`spec.coverage()`), "
        "`residual` whether a group acts on the model's first hidden axis (word embedding "
        "columns, else the first Conv/Linear's output channels). \"why short\" is given for "
        f"every row that is not on target: the exception, or why the residual stream is fixed "
        "and the reasons of the fixed hidden axes (share of all parameter elements).",
        "",
    ]
    rechecked = [r for r in rows if r.get("check_note")]
    if rechecked:
        lines += ["Judged on weights perturbed farther from their initialisation (0.1 N(0, 1)), "
                  "because near it a selection (top-k, argmax) picked among values equal but "
                  "for rounding and the check could not judge: "
                  + ", ".join(f"`{r['type']}`" for r in rechecked) + ".", ""]
    # failure categories
    fails: dict[str, dict[str, list[dict]]] = {}
    for r in rows:
        if r["status"] in ("trace-error", "check-error", "caught", "timeout", "crash") and r.get("built"):
            fails.setdefault(r["status"], {}).setdefault(category(r.get("message", "")), []).append(r)
    short: dict[str, list[dict]] = {}
    for r in rows:
        if r["status"] == "exact" and not on_target(r):
            if r.get("residual") is not True and r.get("head"):
                key = "residual stream fixed: " + category(r.get("residual_why", "") or "?")
            else:
                top = r.get("short") or [["?", 0]]
                key = f"coverage < {TARGET_COVERAGE}: " + category(top[0][0])
            if architectural(r):
                key = "(architecture) " + key
            short.setdefault(key, []).append(r)
    lines += ["## Failure categories", "",
              "Built types that are not exact, grouped by their error with model-specific names "
              "and numbers made generic (`<name>`, `N`, `'…'`); then exact types that miss the "
              "target, grouped by why (\"(architecture)\": held back by the architecture alone, "
              "see the summary). Each with up to three examples and one exact message.", ""]
    for status in ("caught", "check-error", "trace-error", "timeout", "crash"):
        cats = fails.get(status)
        if not cats:
            continue
        lines += [f"### {status} ({sum(len(v) for v in cats.values())})", "",
                  "| n | category | examples | one message |", "|---:|---|---|---|"]
        for cat, rs in sorted(cats.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            lines.append(f"| {len(rs)} | {_md(cat)} | "
                         + ", ".join(f"`{r['type']}`" for r in rs[:3])
                         + f" | {_md(rs[0].get('message', ''))[:400]} |")
        lines.append("")
    if short:
        lines += [f"### exact but short of the target ({sum(len(v) for v in short.values())})", "",
                  "| n | category | examples |", "|---:|---|---|"]
        for cat, rs in sorted(short.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            lines.append(f"| {len(rs)} | {_md(cat)} | "
                         + ", ".join(f"`{r['type']}`" for r in rs[:3]) + " |")
        lines.append("")
    causes = [r for r in rows if r.get("built") and not on_target(r) and not architectural(r)
              and r["type"] in SHORT_CAUSES]
    if causes:
        lines += ["Why the other types off target are short, read in transformers' code "
                  "(`SHORT_CAUSES`):", ""]
        lines += [f"- `{r['type']}`: {SHORT_CAUSES[r['type']]}" for r in causes]
        lines.append("")
    not_built = [r for r in rows if not r.get("built")]
    if not_built:
        cats2: dict[str, list[dict]] = {}
        for r in not_built:
            cats2.setdefault(category(r.get("message", "")), []).append(r)
        lines += [f"### not built ({len(not_built)})", "",
                  "| n | category | types | one message |", "|---:|---|---|---|"]
        for cat, rs in sorted(cats2.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            lines.append(f"| {len(rs)} | {_md(cat)} | "
                         + ", ".join(f"`{r['type']}`" for r in rs[:8])
                         + (f" (+{len(rs) - 8})" if len(rs) > 8 else "")
                         + f" | {_md(rs[0].get('message', ''))[:400]} |")
        lines.append("")
    if OVERRIDES:
        lines += ["## Config overrides", "", "| type | override | why |", "|---|---|---|"]
        for t, (kw, why) in sorted(OVERRIDES.items()):
            lines.append(f"| `{t}` | `{_md(json.dumps(kw))}` | {_md(why)} |")
        lines.append("")
    lines += ["## All types", "",
              "| type | model class | params (M) | inputs | level | attn | front end | status "
              "| groups | coverage | residual | max rel err | infer time (s) | why short |",
              "|---|---|---:|---|---|---|---|---|---:|---:|---|---:|---:|---|"]
    for r in rows:
        res = {True: "yes", False: "no", None: ""}.get(r.get("residual"), "")
        cov = num(r.get("coverage"), ".3f")
        lines.append("| " + " | ".join([
            r["type"], f"`{r.get('cls') or r.get('base_class')}`",
            num(r["params"] / 1e6 if isinstance(r.get("params"), int) else None, ".2f"),
            ", ".join(r.get("inputs") or []), r.get("level", ""), r.get("attn", ""),
            r.get("capture", "") or "", r["status"], str(r.get("groups", "")), cov, res,
            num(r.get("err"), ".1e"), num(r.get("infer_s"), ".1f"),
            "" if on_target(r) else _md(_why(r))[:400],
        ]) + " |")
    lines.append("")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text("\n".join(lines))
    meta = {"command": cmd, "date": date, "transformers": transformers.__version__,
            "torch": torch.__version__, "python": platform.python_version(), "rtol": RTOL,
            "seeds": list(SEEDS), "elapsed_min": elapsed / 60, "jobs": jobs, "reruns": reruns,
            "summary": st}
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return st


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help="comma-separated model types (e.g. llama,bert,vit)")
    p.add_argument("--limit", type=int, default=0, help="run only the first N types")
    p.add_argument("--jobs", type=int, default=1, help="types run in parallel")
    p.add_argument("--out", default="docs/", help="output folder")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds per type")
    p.add_argument("--mem-gb", type=float, default=0.0,
                   help="kill a worker above this resident memory (default: 12 GiB / jobs)")
    p.add_argument("--base", action="store_true",
                   help="build the base model class, not the type's head (a partial run)")
    p.add_argument("--update", action="store_true",
                   help="with --only: replace those rows in OUT/zoo_hf.json and rewrite "
                        "OUT/zoo_hf.md (the page lists the re-run)")
    p.add_argument("--render", action="store_true",
                   help="rewrite OUT/zoo_hf.md from OUT/zoo_hf.json (its rows and date) without "
                        "running anything")
    args = p.parse_args(argv)

    def published(flag: str) -> dict:
        """The published sweep, its rows without an earlier --update's ``rerun`` flag
        (the meta's reruns list those)."""
        try:
            doc = json.loads((Path(args.out) / "zoo_hf.json").read_text())
        except (OSError, ValueError) as e:
            p.error(f"{flag}: cannot read {Path(args.out) / 'zoo_hf.json'} ({e}); "
                    "run the full sweep first")
        doc["rows"] = [{k: v for k, v in r.items() if k != "rerun"} for r in doc["rows"]]
        return doc

    if args.render:
        doc = published("--render")
        write_report(doc["rows"], Path(args.out), "zoo_hf", argv, 0.0, 1, doc["meta"])
        return 0

    ensure_importable()

    import warnings
    warnings.filterwarnings("ignore")
    out = Path(args.out)
    partial = bool(args.only or args.limit or args.base)
    stem = "zoo_hf_partial" if partial else "zoo_hf"
    base_doc = None
    if args.update:
        if not args.only or args.base:
            p.error("--update needs --only (the types to re-run) and no --base")
        base_doc = published("--update")
        stem = "zoo_hf"
    t0 = time.monotonic()
    entries = all_types()
    if args.only:
        wanted = [s.strip() for s in args.only.split(",") if s.strip()]
        known = {e["type"] for e in entries}
        unknown = [w for w in wanted if w not in known]
        if unknown:
            p.error(f"unknown model type(s): {', '.join(unknown)}")
        entries = [e for e in entries if e["type"] in wanted]
    if args.limit:
        entries = entries[:args.limit]
    jobs = max(1, args.jobs)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    mem = int((args.mem_gb or 12.0 / jobs) * 2**30)
    # inherited by the forkserver and every worker: nothing is downloaded
    os.environ.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                      HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                      TOKENIZERS_PARALLELISM="false")
    print(f"{len(entries)} model types, {jobs} job(s), {threads} thread(s) each", file=sys.stderr)
    rows = []
    with cf.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(run_one, e, args.base, args.timeout, mem, threads) for e in entries]
        for k, fut in enumerate(cf.as_completed(futures), 1):
            r = fut.result()
            rows.append(r)
            cov = r.get("coverage")
            print(f"[{k}/{len(entries)}] {r['type']} ({r.get('cls')}): {r['status']} "
                  f"capture={r.get('capture')} coverage={cov if cov is None else round(cov, 4)} "
                  f"residual={r.get('residual')} groups={r.get('groups')} "
                  f"infer={r.get('infer_s')}s wall={r['wall_s']}s rss={r['peak_rss_gb']}G "
                  f"{'' if on_target(r) else _why(r)[:200]}", file=sys.stderr, flush=True)
            if k % 20 == 0 and k < len(entries):  # progress page, for a long sweep
                write_report(rows, out, stem + "_progress" if not partial else stem, argv,
                             time.monotonic() - t0, jobs)
    if base_doc is not None:
        for r in rows:
            r["rerun"] = True
        new = {r["type"] for r in rows}
        rows = [r for r in base_doc["rows"] if r["type"] not in new] + rows
    st = write_report(rows, out, stem, argv, time.monotonic() - t0, jobs,
                      base_doc["meta"] if base_doc is not None else None)
    if not partial and (out / "zoo_hf_progress.md").exists():
        for ext in ("md", "json"):
            (out / f"zoo_hf_progress.{ext}").unlink(missing_ok=True)
    print(f"wrote {out / (stem + '.md')}: built {st['built']}/{st['tried']}, exact {st['exact']}, "
          f"on target {st['on_target']}, caught {st['caught']}", file=sys.stderr)
    return 0


if __name__ == WORKER_RUN_NAME:
    ensure_importable()
    _worker_entry(*WORKER_ARGS)  # noqa: F821 - given by run_one
elif __name__ == "__main__":
    sys.exit(main())
