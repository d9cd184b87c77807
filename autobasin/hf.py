"""Hugging Face model folders: what ``save_pretrained`` writes, read and written back.

A model folder holds ``config.json`` and the weights as ``model.safetensors`` or as
shards with ``model.safetensors.index.json`` (tokenizer and generation files may sit
beside them). :func:`load_folder` builds the class the config names
(``config.architectures[0]``, from ``transformers``) and loads the weights with
``from_pretrained(..., local_files_only=True)``: transformers reads the shards and the
index, so no safetensors reader is written here. Nothing is downloaded: a hub id
(``org/name``) that is not a local folder fails with a message saying so.
:func:`save_folder` writes a folder that ``from_pretrained`` loads (``save_pretrained``,
sharded with an index above ``max_shard_size``) and copies the tokenizer and
generation files of the folder the model came from.

The command line names such a model ``hf:PATH`` (:func:`is_hf`).
"""
from __future__ import annotations

import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .models import ModelSpecError

__all__ = ["FolderError", "is_hf", "hf_folder", "load_folder", "save_folder", "folder_weights",
           "SIDE_FILES"]

PREFIX = "hf:"
# Files beside the weights that a loader of the written folder also wants (the
# tokenizer, generation defaults, chat template, preprocessing), copied by save_folder.
SIDE_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*",
              "merges.txt", "spiece.model", "sentencepiece*.model", "generation_config.json",
              "chat_template*", "preprocessor_config.json", "processor_config.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_NEEDS = ("a model folder is what save_pretrained writes: config.json and model.safetensors "
          "(or shards with model.safetensors.index.json)")


class FolderError(ModelSpecError):
    """A path is not a usable model folder (exit code 2 on the command line)."""


def is_hf(spec: str | None) -> bool:
    """True for a model string ``hf:PATH``."""
    return isinstance(spec, str) and spec.startswith(PREFIX)


def hf_folder(spec: str | Path) -> Path:
    """The model folder of ``hf:PATH`` (or of a plain path), checked: it exists and holds
    ``config.json``. A missing path that looks like a hub id (``org/name``) gets a message
    that hub downloads are not available offline. Raises :class:`FolderError`."""
    text = str(spec)
    text = text[len(PREFIX):] if text.startswith(PREFIX) else text
    if not text:
        raise FolderError(f"hf: needs a folder, as hf:PATH; {_NEEDS}")
    path = Path(text).expanduser()
    if not path.exists():
        if _HUB_ID.match(text):
            raise FolderError(f"{text!r} is no local folder, and downloading it from the "
                              "Hugging Face hub is not available (autobasin works offline): pass "
                              "a local folder written by save_pretrained")
        raise FolderError(f"{path}: no such model folder; {_NEEDS}")
    if not path.is_dir():
        raise FolderError(f"{path} is a file, not a model folder; {_NEEDS}")
    if not (path / "config.json").is_file():
        raise FolderError(f"{path} holds no config.json, so it is not a model folder; {_NEEDS}")
    return path


@contextmanager
def _progress_bars(show: bool):
    """transformers' progress bars (loading, writing shards) on or off for the block."""
    from transformers.utils import logging as hf_logging
    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if show else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def folder_weights(folder: Path) -> list[Path]:
    """The weight files of a model folder: the safetensors index and its shards, or
    ``model.safetensors`` (or PyTorch ``.bin`` weights, which transformers also loads)."""
    found = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.safetensors.index.json"))
    return found or sorted(folder.glob("pytorch_model*.bin"))


def _model_class(config, folder: Path):
    import transformers
    names = getattr(config, "architectures", None) or []
    if names:
        cls = getattr(transformers, names[0], None)
        if cls is None:
            raise FolderError(f"{folder}/config.json names the architecture {names[0]!r}, which "
                              f"transformers {transformers.__version__} does not define (custom "
                              "code, trust_remote_code, is not run)")
        return cls
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        if type(config) in auto._model_mapping:  # the Auto classes' own registry
            return auto
    raise FolderError(f"{folder}/config.json (model_type {config.model_type!r}) names no "
                      "architecture transformers can build")


def load_folder(path: str | Path, progress: bool = True) -> nn.Module:
    """The model of a ``save_pretrained`` folder (or ``hf:PATH``), in eval mode, with the
    dtypes it was saved in. Every tensor of the model must come from the folder: missing,
    unexpected or mis-shaped weights raise :class:`autobasin.io.CheckpointMismatchError`
    naming them (transformers would initialise missing ones at random)."""
    from .io import CheckpointMismatchError, CheckpointReadError
    folder = hf_folder(path)
    import transformers
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise FolderError(f"{folder}/config.json is not a transformers config: "
                          f"{str(e).strip().splitlines()[0]}") from e
    if not folder_weights(folder):
        raise FolderError(f"{folder} holds config.json but no weights; {_NEEDS}")
    cls = _model_class(config, folder)
    try:
        with _progress_bars(progress):
            model, info = cls.from_pretrained(folder, config=config, local_files_only=True,
                                              output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointReadError(f"loading the model folder {folder} failed: "
                                  f"{str(e).strip().splitlines()[0]}") from e
    problems = {k: sorted(v) for k, v in info.items() if k in (
        "missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        listed = "; ".join(f"{k.replace('_', ' ')}: {', '.join(map(str, v[:5]))}"
                           f"{' ...' if len(v) > 5 else ''}" for k, v in problems.items())
        raise CheckpointMismatchError(f"the weights in {folder} do not fit {cls.__name__} "
                                      f"built from its config.json ({listed})")
    return model.eval()


def _shard_size(like: Path | None) -> int | str:
    """The largest shard of a sharded folder ``like`` (so a result is sharded like its
    source), else 2 GB."""
    shards = [] if like is None or not any(like.glob("*.index.json")) else \
        [f.stat().st_size for f in like.glob("*.safetensors")]
    return max(shards) if shards else "2GB"


def save_folder(model: nn.Module, path: str | Path, like: str | Path | None = None,
                max_shard_size: int | str | None = None, progress: bool = True) -> Path:
    """Write ``model`` (a transformers ``PreTrainedModel``) as a folder ``from_pretrained``
    loads: ``config.json``, safetensors weights (sharded, with an index, above
    ``max_shard_size``: default the largest shard of ``like`` when ``like`` is sharded,
    else 2 GB) and the generation config, via ``save_pretrained``; then the tokenizer,
    generation and processor files (:data:`SIDE_FILES`) of the folder ``like`` that are
    not written yet. Refuses a non-empty ``path`` that is not a model folder."""
    path = Path(path).expanduser()
    like = None if like is None else \
        Path(str(like)[len(PREFIX):] if str(like).startswith(PREFIX) else like).expanduser()
    if max_shard_size is None:
        max_shard_size = _shard_size(like)
    if not hasattr(model, "save_pretrained"):
        raise FolderError(f"{type(model).__name__} has no save_pretrained: only transformers "
                          "models are written as model folders")
    if path.exists() and (not path.is_dir() or (any(path.iterdir())
                                                and not (path / "config.json").is_file())):
        raise FolderError(f"{path} exists and is not a model folder; give a new or model "
                          "folder to write into")
    # transformers 5 writes safetensors only (no safe_serialization switch), sharding above
    # max_shard_size, and removes shards of an earlier save in the folder
    with _progress_bars(progress):
        model.save_pretrained(path, max_shard_size=max_shard_size)
    if like is not None:
        for pattern in SIDE_FILES:
            for f in sorted(like.glob(pattern)):
                if f.is_file() and not (path / f.name).exists():
                    shutil.copy2(f, path / f.name)
    return path


def random_ids(model: nn.Module, seq_len: int, batch: int = 2, seed: int = 0) -> dict | None:
    """``{"input_ids": (batch, seq_len)}`` random ids below the config's ``vocab_size``,
    for a model whose forward takes ``input_ids``; None for another model."""
    from .batches import forward_parameters, model_device
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if "input_ids" not in forward_parameters(model) or not vocab:
        return None
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, int(vocab), (batch, seq_len), generator=gen)
            .to(model_device(model))}


def save_state_folder(model: nn.Module, state_dict: dict, path: str | Path,
                      like: str | Path | None = None, max_shard_size: int | str | None = None,
                      progress: bool = True) -> Path:
    """:func:`save_folder` of a copy of ``model`` holding ``state_dict`` (every key of
    the model, strictly: a key that does not fit raises, naming it)."""
    import copy
    from .io import load_into
    out = load_into(copy.deepcopy(model), state_dict, source="the result")
    return save_folder(out, path, like=like, max_shard_size=max_shard_size, progress=progress)
