"""Text corpora for language models (autobasin.text): files, splits, tokens, windows,
batches, the causal LM loss and its evaluation; and dict batches as keyword inputs in
the batch plumbing (autobasin.batches) that barriers and REPAIR use."""
from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch
from torch import nn

from autobasin.batches import batch_inputs, default_loss, keyword_inputs, score_batch
from autobasin.barrier import evaluate
from autobasin.data import DataError
from autobasin.text import (causal_lm_loss, encode, lm_batches, lm_eval, split_files,
                            split_tokens, stdlib_files, text_files, windows)


class TinyLM(nn.Module):
    """A causal LM of bytes with a Hugging Face-like signature: forward(input_ids, ...)."""

    def __init__(self, vocab=256, dim=16):
        super().__init__()
        self.emb, self.head = nn.Embedding(vocab, dim), nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask=None):
        return {"logits": self.head(self.emb(input_ids))}


def test_text_files_recurse_sorted_and_skip_binary_and_hidden(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("zzz")
    (tmp_path / "a.py").write_text("print(1)\n")
    (tmp_path / "bin.dat").write_bytes(b"\x00\x01\x02")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")  # not UTF-8
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref")
    assert text_files(tmp_path) == [tmp_path / "a.py", tmp_path / "b" / "z.txt"]
    assert text_files(tmp_path / "a.py") == [tmp_path / "a.py"]


def test_text_files_errors_name_the_path(tmp_path):
    (tmp_path / "bin.dat").write_bytes(b"\x00\x01")
    with pytest.raises(DataError, match="no UTF-8 text files"):
        text_files(tmp_path)
    with pytest.raises(DataError, match="not a UTF-8 text file"):
        text_files(tmp_path / "bin.dat")
    with pytest.raises(DataError, match="nope"):
        text_files(tmp_path / "nope")


def test_stdlib_files_are_sorted_py_files_without_site_packages():
    files = stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    assert len(files) > 100 and files == sorted(files)
    assert all(f.suffix == ".py" and root in f.parents for f in files)
    assert not any("site-packages" in f.parts for f in files)
    assert root / "json" / "__init__.py" in files


def test_split_files_holds_out_the_last_files():
    files = [Path(f"{i:02d}.txt") for i in range(20)]
    train, held = split_files(files, heldout=0.1)
    assert held == files[18:] and train == files[:18]
    assert split_files(files[:2], heldout=0.1) == (files[:1], files[1:2])  # at least one
    assert split_files(files[:1]) == (files[:1], [])


def test_split_tokens_holds_out_the_tail():
    train, held = split_tokens(torch.arange(100), 0.1)
    assert torch.equal(held, torch.arange(90, 100)) and torch.equal(train, torch.arange(90))


def test_encode_bytes_round_trip_and_tokenizer(tmp_path):
    (tmp_path / "a.txt").write_text("héllo ")
    (tmp_path / "b.txt").write_text("world")
    tokens = encode([tmp_path / "a.txt", tmp_path / "b.txt"])
    assert tokens.dtype == torch.long and tokens.dim() == 1
    assert bytes(tokens.tolist()).decode() == "héllo world"

    class Upper:  # stands in for a transformers tokenizer: a callable giving input_ids
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [ord(c) for c in text.upper()]}
    ids = encode([tmp_path / "a.txt", tmp_path / "b.txt"], tokenizer=Upper())
    assert ids.tolist() == [ord(c) for c in "HÉLLO "] + [0] + [ord(c) for c in "WORLD"]


def test_windows_and_batches():
    w = windows(torch.arange(10), 3)
    assert w.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]  # tail dropped
    batches = lm_batches(w, 2)
    assert [b["input_ids"].shape for b in batches] == [(2, 3), (1, 3)]
    shuffled = lm_batches(torch.arange(40).view(20, 2), 20, shuffle=True, seed=1)
    assert sorted(shuffled[0]["input_ids"][:, 0].tolist()) == list(range(0, 40, 2))
    assert shuffled[0]["input_ids"][:, 0].tolist() != list(range(0, 40, 2))
    assert torch.equal(shuffled[0]["input_ids"],
                       lm_batches(torch.arange(40).view(20, 2), 20, shuffle=True, seed=1)[0]["input_ids"])


def test_causal_lm_loss_is_next_token_cross_entropy():
    ids = torch.tensor([[1, 2, 3]])
    logits = torch.full((1, 3, 4), -1e4)
    logits[0, 0, 2] = logits[0, 1, 3] = 0.0  # predicts the next token exactly
    logits[0, 2, 0] = 0.0  # the last position predicts nothing
    assert float(causal_lm_loss(logits, ids)) == pytest.approx(0.0, abs=1e-6)
    assert float(causal_lm_loss({"logits": logits}, ids)) == pytest.approx(0.0, abs=1e-6)
    uniform = torch.zeros(2, 5, 7)
    assert float(causal_lm_loss(uniform, torch.zeros(2, 5, dtype=torch.long))) == \
        pytest.approx(torch.log(torch.tensor(7.0)).item(), rel=1e-6)
    with pytest.raises(ValueError, match="B, T, V"):
        causal_lm_loss(torch.zeros(2, 7), torch.zeros(2, 5, dtype=torch.long))


def test_lm_eval_weights_tokens_and_restores_modes():
    torch.manual_seed(0)
    model = TinyLM().train()
    w = torch.randint(0, 256, (5, 8))
    batches = lm_batches(w, 2)  # 2 + 2 + 1 windows: a token mean, not a batch mean
    loss, acc = lm_eval(model, batches)
    with torch.no_grad():
        ref = causal_lm_loss(model(w), w)
    assert loss == pytest.approx(float(ref), rel=1e-5)
    assert 0.0 <= acc <= 1.0
    assert model.training  # restored
    assert evaluate(model, batches) == pytest.approx((loss, acc), rel=1e-5)


def test_dict_batches_are_keyword_inputs_of_the_forward():
    model = TinyLM()
    ids, mask = torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4)
    inputs = batch_inputs({"input_ids": ids, "attention_mask": mask, "labels": ids}, model=model)
    assert inputs.args == () and set(inputs.kwargs) == {"input_ids", "attention_mask"}
    # an image model's dict batch stays positional
    conv = nn.Conv2d(1, 2, 3)
    x = torch.zeros(2, 1, 5, 5)
    assert keyword_inputs({"image": x, "label": torch.zeros(2)}, conv) == {}
    assert batch_inputs({"image": x, "label": torch.zeros(2)}, model=conv).args[0] is x


def test_default_loss_by_batch_kind():
    logits = torch.randn(2, 4, 6)
    ids = torch.randint(0, 6, (2, 4))
    assert torch.equal(default_loss(logits, {"input_ids": ids}), causal_lm_loss(logits, ids))
    labels = torch.full((2, 4), -100)
    labels[0, 1] = 3
    mlm = default_loss({"logits": logits}, {"input_ids": ids, "labels": labels})
    assert float(mlm) == pytest.approx(float(torch.nn.functional.cross_entropy(
        logits[0, 1:2], torch.tensor([3]))), rel=1e-6)
    loss, correct, n = score_batch({"logits": logits}, {"input_ids": ids, "labels": labels})
    assert n == 1  # only the labelled token counts
    flat = torch.randn(3, 5)
    y = torch.tensor([0, 1, 2])
    assert float(default_loss(flat, (None, y))) == \
        pytest.approx(float(torch.nn.functional.cross_entropy(flat, y)))


def test_text_data_for_a_masked_lm_is_masked_windows_scored_by_the_model_loss(tmp_path):
    """resolve_data gives a masked LM (BertForMaskedLM) windows with 15% of their
    tokens masked, the same masks for every model, scored on the masked tokens
    only: the loss transformers' model computes from ``labels``."""
    transformers = pytest.importorskip("transformers")
    from autobasin.data import resolve_data
    from autobasin.text import mask_batches
    (tmp_path / "corpus.txt").write_text("def f(x):\n    return x + 1\n" * 200)
    config = transformers.BertConfig(vocab_size=260, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(config).eval()
    data = resolve_data(str(tmp_path / "corpus.txt"), model, batch_size=4, seq_len=16)
    batch = data.eval[0]
    assert set(batch) == {"input_ids", "labels"}
    masked = batch["labels"] != -100
    assert masked.any(-1).all(), "at least one masked token per window"
    assert (batch["input_ids"][masked] == 256).all() and (batch["input_ids"][~masked] < 256).all()
    assert 0.05 < masked.float().mean() < 0.4
    again = resolve_data(str(tmp_path / "corpus.txt"), model, batch_size=4, seq_len=16)
    assert torch.equal(again.eval[0]["input_ids"], batch["input_ids"])
    with torch.no_grad():
        out = model(**batch)
        assert torch.allclose(default_loss(out, batch), out.loss, atol=1e-5)
    with pytest.raises(DataError, match="vocab_size > 256"):
        small = transformers.BertForMaskedLM(transformers.BertConfig(
            vocab_size=256, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=64))
        resolve_data(str(tmp_path / "corpus.txt"), small, batch_size=4, seq_len=16)
    with pytest.raises(ValueError):
        mask_batches([batch], 256, prob=0.0)
