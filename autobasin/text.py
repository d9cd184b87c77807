"""Text corpora for language models: files, tokens, windows, batches and the LM loss.

A corpus is a plain-text file or a folder of text files (:func:`text_files`), or
the running Python's standard library sources (:func:`stdlib_files`, a corpus
every machine has). Files are split by order (:func:`split_files`: the last ones
are held out), encoded as bytes (0..255) or with a ``transformers`` tokenizer
(:func:`encode`; tokenization is never written by hand here), cut into
non-overlapping windows (:func:`windows`) and batched as ``{"input_ids": ...}``
(:func:`lm_batches`), the keyword input a Hugging Face model's ``forward`` takes.
A causal LM is scored by next-token cross-entropy (:func:`causal_lm_loss`,
:func:`lm_eval`).
"""
from __future__ import annotations

import math
import sysconfig
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from .batches import DataError, causal_lm_loss, lm_logits, model_device, to_device
from .guard import eval_mode
from .inputs import as_inputs

__all__ = ["text_files", "stdlib_files", "split_files", "split_tokens", "encode", "windows",
           "lm_batches", "causal_lm_loss", "lm_eval", "is_text_file", "tokenizer_for",
           "text_splits", "is_masked_lm", "mask_token_id", "mask_batches"]

_SNIFF = 1 << 16  # bytes read to decide whether a file is text


def is_text_file(path: Path) -> bool:
    """True for a readable file whose bytes decode as UTF-8 and hold no NUL byte."""
    try:
        raw = path.read_bytes()
    except OSError:
        return False
    if b"\0" in raw[:_SNIFF]:
        return False
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def text_files(path: str | Path) -> list[Path]:
    """The text files of ``path``: a file gives ``[path]`` (it must decode as UTF-8);
    a folder gives its non-empty text files, recursively, in sorted path order,
    skipping hidden files and folders (``.git``) and files that are binary (a NUL
    byte) or not UTF-8. Raises :class:`autobasin.data.DataError` naming ``path``
    when it does not exist or holds no text file."""
    path = Path(path).expanduser()
    if path.is_file():
        if not is_text_file(path):
            raise DataError(f"text data {path}: not a UTF-8 text file")
        return [path]
    if not path.is_dir():
        raise DataError(f"text data {path}: no such file or folder")
    files = sorted(p for p in path.rglob("*")
                   if p.is_file() and not any(part.startswith(".")
                                              for part in p.relative_to(path).parts)
                   and p.stat().st_size > 0 and is_text_file(p))
    if not files:
        raise DataError(f"text data {path}: the folder holds no UTF-8 text files")
    return files


def stdlib_files() -> list[Path]:
    """The ``.py`` files of the running Python's standard library
    (``sysconfig.get_paths()["stdlib"]``), in sorted path order, without
    ``site-packages`` / ``dist-packages`` (installed packages differ between machines)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return sorted(p for p in root.rglob("*.py")
                  if p.is_file() and not skip.intersection(p.relative_to(root).parts))


def split_files(files: Sequence[str | Path], heldout: float = 0.1
                ) -> tuple[list[Path], list[Path]]:
    """``(train, heldout)``: the last ``round(len(files) * heldout)`` files in the
    given order are held out, at least one (and at most all but one) when there
    are two files or more. One file gives ``([file], [])``: split its tokens
    with :func:`split_tokens` instead."""
    if not 0 <= heldout < 1:
        raise ValueError(f"heldout must be in [0, 1), got {heldout}")
    files = [Path(f) for f in files]
    n = len(files)
    k = round(n * heldout)
    if n >= 2 and heldout > 0:
        k = min(max(k, 1), n - 1)
    elif n < 2:
        k = 0
    return files[:n - k], files[n - k:]


def split_tokens(tokens: torch.Tensor, heldout: float = 0.1
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, heldout)`` of a 1-D token tensor: its last ``heldout`` fraction
    (rounded up) is held out; the split of a single text file."""
    if not 0 <= heldout < 1:
        raise ValueError(f"heldout must be in [0, 1), got {heldout}")
    k = math.ceil(tokens.numel() * heldout)
    return tokens[:tokens.numel() - k], tokens[tokens.numel() - k:]


def encode(files: Iterable[str | Path] | str | Path, tokenizer: Any = None) -> torch.Tensor:
    """The files' tokens, concatenated in order, as a 1-D int64 tensor.

    Without ``tokenizer``: each file's raw bytes (values 0..255), so the tokens
    round-trip to the files exactly. With a ``transformers`` tokenizer: each file
    decoded as UTF-8 and encoded with ``tokenizer(text, add_special_tokens=False)``,
    files separated by the tokenizer's EOS token when it has one.
    """
    if isinstance(files, (str, Path)):
        files = [files]
    parts: list[torch.Tensor] = []
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    for f in files:
        raw = Path(f).read_bytes()
        if tokenizer is None:
            parts.append(torch.frombuffer(bytearray(raw), dtype=torch.uint8).long())
            continue
        ids = tokenizer(raw.decode("utf-8", errors="replace"),
                        add_special_tokens=False)["input_ids"]
        if parts and eos is not None:
            parts.append(torch.tensor([eos], dtype=torch.long))
        parts.append(torch.as_tensor(ids, dtype=torch.long))
    if not parts:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat(parts)


def windows(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``(N, seq_len)`` non-overlapping windows of a 1-D token tensor, in order;
    the tail shorter than ``seq_len`` is dropped (N may be 0)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    tokens = tokens.reshape(-1)
    n = tokens.numel() // seq_len
    return tokens[:n * seq_len].reshape(n, seq_len)


def lm_batches(windows: torch.Tensor, batch_size: int, shuffle: bool = False,
               seed: int = 0) -> list[dict]:
    """``[{"input_ids": (B, seq_len) int64}, ...]``: the windows in order (or in an
    order set by ``seed`` when ``shuffle``), ``batch_size`` per batch, the last
    batch possibly smaller."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    w = windows.long()
    if shuffle:
        w = w[torch.randperm(len(w), generator=torch.Generator().manual_seed(seed))]
    return [{"input_ids": w[i:i + batch_size]} for i in range(0, len(w), batch_size)]


def lm_eval(model: torch.nn.Module, batches: Iterable, device: torch.device | str | None = None
            ) -> tuple[float, float]:
    """``(loss, accuracy)`` of a causal LM over ``batches``: the mean next-token
    cross-entropy over every predicted token (each window predicts its tokens
    1..T-1) and the fraction predicted exactly by the argmax. Batches are
    ``{"input_ids": ...}`` dicts (other keys are passed to the model as keywords)
    or id tensors. Runs in eval mode without grad; the model's train/eval flags
    are restored."""
    device = torch.device(device) if device is not None else model_device(model)
    total, correct, count = 0.0, 0, 0
    with eval_mode(model), torch.no_grad():
        for batch in batches:
            batch = {"input_ids": batch} if isinstance(batch, torch.Tensor) else dict(batch)
            batch = {k: to_device(v, device) for k, v in batch.items()}
            ids = batch["input_ids"]
            logits = lm_logits(as_inputs(batch, model).call(model))[:, :-1].float()
            target = ids[:, 1:]
            total += float(torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"))
            correct += int((logits.argmax(-1) == target).sum())
            count += target.numel()
    if count == 0:
        raise ValueError("the evaluation batches hold no predicted tokens (windows of length >= 2 "
                         "are needed)")
    return total / count, correct / count


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model",
                    "spiece.model", "vocab.txt")


def tokenizer_for(model_or_folder: Any) -> Any:
    """The ``transformers`` tokenizer saved in a model folder
    (``AutoTokenizer.from_pretrained(folder, local_files_only=True)``), given the folder
    or a model loaded from it (its ``name_or_path``); None when there is none."""
    folder = model_or_folder if isinstance(model_or_folder, (str, Path)) else \
        getattr(model_or_folder, "name_or_path", None)
    if not folder or not Path(folder).is_dir():
        return None
    if not any((Path(folder) / f).is_file() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise DataError(f"the tokenizer in {folder} does not load: "
                        f"{str(e).strip().splitlines()[0]}") from e


def text_splits(path: str | Path, tokenizer: Any = None, heldout: float = 0.1
                ) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(train tokens, held-out tokens, description)`` of a text file or folder:
    several files are split by :func:`split_files`, a single file by
    :func:`split_tokens` (its last ``heldout`` fraction of tokens)."""
    files = text_files(path)
    how = "byte-level" if tokenizer is None else \
        f"tokens of the tokenizer in {getattr(tokenizer, 'name_or_path', '') or 'the model folder'}"
    if len(files) >= 2:
        train_files, held_files = split_files(files, heldout)
        train, held = encode(train_files, tokenizer), encode(held_files, tokenizer)
        desc = (f"text {path}: {len(files)} files, {how}; the last {len(held_files)} "
                f"held out")
    else:
        train, held = split_tokens(encode(files, tokenizer), heldout)
        desc = f"text file {path}, {how}; its last {heldout:.0%} of tokens held out"
    return train, held, desc


def is_masked_lm(model: Any) -> bool:
    """Whether ``model`` is a transformers masked LM (its class is one
    ``AutoModelForMaskedLM`` builds: BERT, RoBERTa, ... ``ForMaskedLM``)."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES
    except ImportError:
        return False
    return type(model).__name__ in set(MODEL_FOR_MASKED_LM_MAPPING_NAMES.values())


def mask_token_id(model: Any, tokenizer: Any = None) -> int:
    """The id that replaces masked tokens: the tokenizer's ``mask_token_id``; for
    byte-level tokens (no tokenizer) id 256, which needs ``vocab_size > 256``.
    Raises :class:`DataError` when there is none."""
    if tokenizer is not None:
        if getattr(tokenizer, "mask_token_id", None) is None:
            raise DataError("the model folder's tokenizer has no mask token, so masked-LM "
                            "windows cannot be made")
        return int(tokenizer.mask_token_id)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 0
    if vocab <= 256:
        raise DataError(f"a masked LM on byte-level tokens needs a mask id beyond the bytes "
                        f"(vocab_size > 256, id 256 is used); this model has vocab_size {vocab}: "
                        "put its tokenizer in the model folder")
    return 256


def mask_batches(batches: Iterable[dict], mask_id: int, prob: float = 0.15, seed: int = 0
                 ) -> list[dict]:
    """Masked-LM batches ``{"input_ids", "labels"}`` from ``{"input_ids"}`` ones:
    each token is masked with probability ``prob`` (at least one per window),
    drawn from a generator seeded by ``seed`` so that every model sees the same
    masks; masked tokens become ``mask_id`` and keep their id as the label,
    the others are labelled ``-100`` (not scored), as transformers' masked LMs
    expect."""
    from .batches import IGNORE_INDEX
    if not 0 < prob < 1:
        raise ValueError(f"prob must be in (0, 1), got {prob}")
    gen = torch.Generator().manual_seed(seed)
    out = []
    for batch in batches:
        ids = batch["input_ids"]
        chosen = torch.rand(ids.shape, generator=gen) < prob
        first = torch.randint(0, ids.shape[-1], ids.shape[:-1], generator=gen)
        chosen.scatter_(-1, first.unsqueeze(-1), True)  # at least one per window
        masked = dict(batch)
        masked["input_ids"] = ids.masked_fill(chosen, mask_id)
        masked["labels"] = ids.masked_fill(~chosen, IGNORE_INDEX)
        out.append(masked)
    return out
