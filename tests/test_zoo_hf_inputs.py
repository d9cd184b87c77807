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
