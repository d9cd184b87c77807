"""The Hugging Face zoo's input construction (``benchmarks/zoo_hf.py``): a
multimodal model gets every modality its forward takes, with the placeholder
tokens its processor would write, so that its towers are used."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

T = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import zoo_hf  # noqa: E402


def _tiny(model_type: str):
    cfg_cls = T.CONFIG_MAPPING[model_type]
    cfg = cfg_cls(**zoo_hf.shrink_kwargs(cfg_cls(), True, zoo_hf.IMAGE, True))
    cls = getattr(T, zoo_hf.model_classes(model_type, False)[0])
    torch.manual_seed(0)
    return cls._from_config(cfg).eval(), cfg


def test_zoo_hf_finds_sizes_in_any_sub_config():
    # FLAVA's image size lives in image_config, T5Gemma 2's in encoder.vision_config
    for t in ("flava", "t5gemma2"):
        cfg_cls = T.CONFIG_MAPPING[t]
        cfg = cfg_cls(**zoo_hf.shrink_kwargs(cfg_cls(), True, zoo_hf.IMAGE, True))
        assert zoo_hf._find(cfg, "image_size") == zoo_hf.IMAGE, t


def test_zoo_hf_audio_lm_gets_its_audio_with_placeholders():
    # Qwen2-Audio: no get_audio_features; the count comes from its complaint about two
    # placeholders a sample, and the merged set is the first one that runs
    model, cfg = _tiny("qwen2_audio")
    options = zoo_hf.input_options(model, cfg, torch.Generator().manual_seed(0))
    for inputs in options:
        try:
            zoo_hf._run(model, inputs)
        except Exception:  # noqa: BLE001 - the harness tries the next set too
            continue
        break
    assert "input_features" in inputs
    n = int((inputs["input_ids"] == cfg.audio_token_id).sum(1)[0])
    assert n > 0 and (inputs["input_ids"] == cfg.audio_token_id).sum(1).eq(n).all()


def _first_that_runs(model, cfg):
    for inputs in zoo_hf.input_options(model, cfg, torch.Generator().manual_seed(0)):
        try:
            zoo_hf._run(model, inputs)
        except Exception:  # noqa: BLE001 - the harness tries the next set too
            continue
        return inputs
    raise AssertionError("no input set runs")


def test_zoo_hf_images_and_audio_together():
    # Qwen2.5-Omni's thinker takes both: its audio tower must be used as well as its
    # vision tower, each modality with its own placeholders
    model, cfg = _tiny("qwen2_5_omni_thinker")
    inputs = _first_that_runs(model, cfg)
    assert "pixel_values" in inputs and "input_features" in inputs
    ids = inputs["input_ids"]
    assert (ids == cfg.image_token_id).sum() > 0 and (ids == cfg.audio_token_id).sum() > 0


class _TableAdded(torch.nn.Module):
    """A residual stream with a position table the checkpoint does not hold."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 8)
        self.register_buffer("table", torch.randn(5, 8), persistent=False)
        self.fc1, self.fc2, self.head = (torch.nn.Linear(8, 16), torch.nn.Linear(16, 8),
                                         torch.nn.Linear(8, 3))

    def forward(self, ids):
        h = self.emb(ids) + self.table
        return self.head(h + self.fc2(torch.relu(self.fc1(h))))


def test_zoo_hf_architecture_alone_is_told_apart():
    from autobasin.infer import infer_spec
    spec = infer_spec(_TableAdded().eval(), torch.randint(0, 10, (2, 5)))
    # the stream is fixed by the table (hidden, lost), the MLP's units permute
    assert spec.coverage() < 0.9
    assert zoo_hf.architectural_coverage(spec) == 1.0
    row = {"status": "exact", "coverage": spec.coverage(), "head": True, "residual": False,
           "residual_why": "table is not in the state_dict",
           "coverage_arch": zoo_hf.architectural_coverage(spec)}
    assert zoo_hf.architectural(row)
    # a stream fixed for want of a rule is not the architecture's doing
    assert not zoo_hf.architectural({**row, "residual_why": "foo: no rule for ATen op aten.foo"})
    assert not zoo_hf.architectural({**row, "coverage_arch": 0.5})


def test_zoo_hf_mode_flag_is_a_further_input_set():
    # Granite-Docling's vision model runs its fine connector only with fine=True: that
    # path comes as a further input set, so both connectors are inferred and checked
    model, inputs, _ = zoo_hf.build("granite_docling_vision", False)
    more = zoo_hf.mode_inputs(model, inputs)
    assert [sorted(set(m) - set(inputs)) for m in more] == [["fine"]]
    from autobasin.infer import infer_spec
    spec = infer_spec(model, inputs, more_inputs=more)
    assert not any("not used" in why for _, why in spec.fixed_axes())


def test_zoo_hf_phi4_gets_images_audio_and_audio_alone():
    # Phi-4-multimodal names its inputs image_pixel_values / audio_input_features, keeps
    # audio_embed_sizes projected audio features a sample (that many placeholders), and
    # projects audio one way beside images and another way alone: the audio-only set
    # comes as a further input set, so both projectors are used
    model, inputs, _ = zoo_hf.build("phi4_multimodal", False)
    assert "audio_input_features" in inputs and "image_pixel_values" in inputs
    n = int(inputs["audio_embed_sizes"][0])
    tok = model.config.audio_config.audio_token_id
    assert (inputs["input_ids"] == tok).sum(1).eq(n).all()
    more = zoo_hf.reach_inputs(model, inputs)
    assert len(more) == 1 and "image_pixel_values" not in more[0]
    used = zoo_hf._used_modules(model, inputs) | zoo_hf._used_modules(model, more[0])
    assert any("up_proj_for_speech" in n for n in used)
    assert any("up_proj_for_vision_speech" in n for n in used)


def test_zoo_hf_global_attention_and_box_prompts_are_further_input_sets():
    # Longformer's global projections run only for tokens marked global, SAM 3's
    # geometry encoder only with a box prompt: each comes as a further input set
    model, inputs, _ = zoo_hf.build("longformer", False)
    more = zoo_hf.mode_inputs(model, inputs)
    assert [sorted(set(m) - set(inputs)) for m in more] == [["global_attention_mask"]]
    mask = more[0]["global_attention_mask"]
    assert mask[:, 0].eq(1).all() and mask[:, 1:].eq(0).all()
    used = zoo_hf._used_modules(model, more[0])
    assert any(n.endswith("query_global") for n in used)
    assert not any(n.endswith("query_global") for n in zoo_hf._used_modules(model, inputs))
    boxes = zoo_hf.MODE_INPUTS["input_boxes"]({"pixel_values": torch.zeros(2, 3, 8, 8)})
    assert boxes["input_boxes"].shape == (2, 1, 4) and boxes["input_boxes_labels"].shape == (2, 1)


def test_zoo_hf_audio_codes_and_space_time_patches_reach_inklings_towers():
    # Inkling takes audio as codes (audios, frames, codebooks) and images as
    # channels-last space-time patches, each with its placeholder tokens
    model, inputs, _ = zoo_hf.build("inkling_mm_model", False)
    cfg = model.config
    assert inputs["audio_input_ids"].dim() == 3 and inputs["pixel_values"].dim() == 5
    assert int(inputs["audio_input_ids"].max()) < cfg.audio_config.mel_vocab_size
    ids = inputs["input_ids"]
    assert (ids == cfg.audio_token_id).sum(1).eq(inputs["audio_input_ids"].shape[1]).all()
    assert (ids == cfg.image_token_id).sum(1).eq(1).all()
    used = zoo_hf._used_modules(model, inputs)
    assert any("audio_tower" in n for n in used) and any("vision_tower" in n for n in used)


def test_zoo_hf_vision_tower_alone_gets_flat_patches_and_their_grids():
    # Qwen2.5-VL's tower takes (hidden_states, grid_thw); Kimi K2.5's (pixel_values,
    # grid_thw) with its patches as (patches, C, P, P) for a conv patch embedding
    for t, image in (("qwen2_5_vl_vision", "hidden_states"), ("kimi_k25_vision", "pixel_values")):
        model, cfg = _tiny(t)
        inputs = _first_that_runs(model, cfg)
        assert set(inputs) == {image, "grid_thw"}, t
        assert int(inputs["grid_thw"].prod(1).sum()) == len(inputs[image]), t


def test_zoo_hf_latent_attention_builds_with_as_many_kv_heads_as_heads():
    # DeepSeek-V2 repeats its keys by heads / kv heads although each head has its own:
    # the tiny level's 2 kv heads do not run, the level with kv heads = heads does
    _model, inputs, info = zoo_hf.build("deepseek_v2", False)
    assert info["level"] == "tiny-mha" and info["cls"] == "DeepseekV2ForCausalLM"


def test_zoo_hf_rescales_stated_multimodal_rope_sections_to_the_tiny_head():
    # Cosmos 3 Edge states sections for a 128-wide head; the tiny head's rotary half is 8
    cfg_cls = T.CONFIG_MAPPING["cosmos3_edge_text"]
    cfg = cfg_cls(**zoo_hf.shrink_kwargs(cfg_cls(), True, zoo_hf.IMAGE, True))
    assert sum(cfg.rope_parameters["mrope_section"]) == zoo_hf.HIDDEN // zoo_hf.HEADS // 2


def test_zoo_hf_time_series_get_their_past_and_future_values():
    # Informer (an encoder-decoder forecaster): past values with their lags, time
    # features and observed mask, and the known future its decoder runs on; TimesFM:
    # a few of its patches (its default context is 512 steps), padding and frequency
    for t, want in (("informer", {"past_values", "past_time_features", "past_observed_mask",
                                  "future_values", "future_time_features"}),
                    ("timesfm", {"past_values", "past_values_padding", "freq"})):
        cfg_cls = T.CONFIG_MAPPING[t]
        kw = zoo_hf._merge(zoo_hf.shrink_kwargs(cfg_cls(), True, zoo_hf.IMAGE, True),
                           zoo_hf.OVERRIDES.get(t, ({}, ""))[0])
        cfg = cfg_cls(**kw)
        model = getattr(T, zoo_hf.model_classes(t, False)[0])._from_config(cfg).eval()
        inputs = _first_that_runs(model, cfg)
        assert set(inputs) == want, t
        assert inputs["past_values"].shape[1] <= zoo_hf.POSITIONS, t


def test_zoo_hf_audio_chunks_come_with_their_sample_lengths():
    # Dots3-Note's audio tower takes each chunk's waveform length beside its mel frames
    # (it masks the frames past it): with them, and with mel bins its stem can take, the
    # audio tower runs together with the images, one placeholder per audio token
    model, inputs, _ = zoo_hf.build("dots3_note", False)
    assert {"input_features", "chunk_sample_lengths", "pixel_values"} <= set(inputs)
    frames = inputs["input_features"].shape[-1]
    hop = model.config.audio_config.hop_length
    assert inputs["chunk_sample_lengths"].eq(frames * hop).all()
    per_token = model.config.audio_config.samples_per_token
    n = frames * hop // per_token
    assert (inputs["input_ids"] == model.config.audio_token_id).sum(1).eq(n).all()
    assert any(name.startswith("audio_tower.") for name in zoo_hf._used_modules(model, inputs))
