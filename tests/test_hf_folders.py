"""Hugging Face model folders end to end: ``autobasin inspect | align | barrier | merge
hf:DIR`` on tiny Llama and GPT-2 folders written by ``save_pretrained`` (one sharded,
one with a tokenizer), the folders they write (``from_pretrained`` loads them and they
compute what their sources compute), text DATA, the errors for what is not a model
folder, and the Python API on models as ``from_pretrained`` gives them."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig,  # noqa: E402
                          LlamaForCausalLM, PreTrainedTokenizerFast)

import autobasin  # noqa: E402
from helpers import one_thread_per_module, run_cli  # noqa: E402,F401 - the fixture: one thread
from autobasin.hf import load_folder, save_folder  # noqa: E402
from autobasin.io import CheckpointMismatchError  # noqa: E402
from autobasin.text import encode, lm_batches, lm_eval, windows  # noqa: E402

TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(300))


def llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2)).eval()


def gpt2(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=32, n_layer=2, n_head=4,
                                      n_positions=64)).eval()


def byte_bpe(text: str, vocab: int = 200) -> PreTrainedTokenizerFast:
    """A small BPE tokenizer trained here with the tokenizers library (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab,
                                                        special_tokens=["<unk>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    out = {"root": root}
    for seed in (0, 1, 2):
        out[f"llama{seed}"] = root / f"llama{seed}"
        llama(seed).save_pretrained(out[f"llama{seed}"])
    tokenizer = byte_bpe(TEXT)
    for seed in (0, 1):
        out[f"gpt{seed}"] = root / f"gpt{seed}"
        gpt2(seed).save_pretrained(out[f"gpt{seed}"])
        tokenizer.save_pretrained(out[f"gpt{seed}"])
    out["text"] = root / "corpus.txt"
    out["text"].write_text(TEXT)
    return out


run = run_cli


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_inspect_prints_the_spec_of_a_folder(folders, capsys):
    code, out, err = run(capsys, "inspect", f"hf:{folders['llama0']}", "--seq-len", 16, "-q")
    assert code == 0, err
    assert re.search(r"PermutationSpec: \d+ groups", out)
    assert "mlp.gate_proj" in out and "verified" in out


@pytest.mark.parametrize("family", ["llama", "gpt"])
def test_align_writes_a_folder_computing_what_b_computes(folders, capsys, tmp_path, family):
    a, b, out = folders[f"{family}0"], folders[f"{family}1"], tmp_path / "aligned"
    code, stdout, err = run(capsys, "align", f"hf:{a}", "--b", b, "--out", out,
                            "--seq-len", 16, "-q")
    assert code == 0, err
    assert "verified: aligned B computes what B computes" in stdout
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert (tmp_path / "aligned.perms.safetensors").is_file()
    cls = LlamaForCausalLM if family == "llama" else GPT2LMHeadModel
    aligned, model_b = cls.from_pretrained(out).eval(), cls.from_pretrained(b).eval()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    assert (logits(aligned, ids) - logits(model_b, ids)).abs().max() < 1e-4
    sd_al, sd_b = aligned.state_dict(), model_b.state_dict()
    assert any(not torch.equal(sd_al[k], sd_b[k]) for k in sd_b)  # permuted, not copied
    if family == "gpt":  # the tokenizer travels with the weights
        assert (out / "tokenizer.json").is_file()


def test_barrier_on_a_text_file(folders, capsys):
    code, out, err = run(capsys, "barrier", f"hf:{folders['llama0']}", "--b", folders["llama1"],
                         "--data", folders["text"], "--seq-len", 32, "-b", 8,
                         "--lambdas", 3, "-q")
    assert code == 0, err
    assert "byte-level" in out and "held out" in out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines()
            if line.startswith("| naive") or line.startswith("| weight")}
    assert set(rows) == {"naive", "weight matching"}
    # the endpoints are the same models in both rows: next-token losses near log(256)
    ends = re.search(r"\| ([\d.]+) / ([\d.]+) \|", rows["naive"]).groups()
    assert all(4.0 < float(x) < 7.0 for x in ends)
    assert ends == re.search(r"\| ([\d.]+) / ([\d.]+) \|", rows["weight matching"]).groups()


def test_barrier_uses_the_folders_tokenizer(folders, capsys):
    code, out, err = run(capsys, "barrier", f"hf:{folders['gpt0']}", "--b", folders["gpt1"],
                         "--data", folders["text"], "--seq-len", 16, "-b", 8,
                         "--lambdas", 3, "-q")
    assert code == 0, err
    assert f"tokens of the tokenizer in {folders['gpt0']}" in out
    from transformers import AutoTokenizer
    tokens = encode(folders["text"], AutoTokenizer.from_pretrained(folders["gpt0"]))
    held = tokens.numel() - int(tokens.numel() * 0.9)  # the last 10%, rounded up
    assert f"heldout split: {held // 16} windows of 16" in out  # not the byte count's
    assert held // 16 != (len(TEXT.encode()) // 10) // 16


def test_merge_of_three_folders_writes_a_loadable_folder(folders, capsys, tmp_path):
    out = tmp_path / "merged"
    code, stdout, err = run(capsys, "merge", f"hf:{folders['llama0']}", folders["llama0"],
                            folders["llama1"], folders["llama2"], "--out", out,
                            "--seq-len", 16, "--max-rounds", 2, "-q")
    assert code == 0, err
    assert "merged 3 checkpoints" in stdout and "verified" in stdout
    merged = LlamaForCausalLM.from_pretrained(out)
    sds = [load_folder(folders[f"llama{s}"]).state_dict() for s in (0, 1, 2)]
    w = merged.state_dict()["model.norm.weight"]  # fixed by every permutation: a plain mean
    assert torch.allclose(w, sum(sd["model.norm.weight"] for sd in sds) / 3, atol=1e-6)


def test_sharded_folders_load_and_save_sharded(folders, tmp_path, capsys):
    sharded = tmp_path / "sharded"
    llama(1).save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    model = load_folder(sharded)
    assert torch.equal(model.state_dict()["lm_head.weight"], llama(1).state_dict()["lm_head.weight"])
    out = tmp_path / "aligned"
    code, _, err = run(capsys, "align", f"hf:{folders['llama0']}", "--b", sharded, "--out", out,
                       "--seq-len", 16, "-q")
    assert code == 0, err
    assert (out / "model.safetensors.index.json").is_file()  # sharded like its source
    assert len(list(out.glob("model-*.safetensors"))) >= 2
    again = save_folder(model, tmp_path / "resaved", max_shard_size="2GB")
    assert (again / "model.safetensors").is_file()


def test_a_folder_that_is_not_a_model_exits_2(folders, capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    code, _, err = run(capsys, "inspect", f"hf:{tmp_path}")
    assert code == 2 and "config.json" in err and str(tmp_path) in err
    code, _, err = run(capsys, "align", f"hf:{folders['llama0']}", "--b", tmp_path,
                       "--out", tmp_path / "o")
    assert code == 2 and "no config.json" in err


def test_a_hub_id_exits_2_saying_downloads_are_not_available(capsys):
    code, _, err = run(capsys, "inspect", "hf:someorg/no-such-model-here")
    assert code == 2
    assert "hub" in err and "save_pretrained" in err and "someorg/no-such-model-here" in err


def test_weights_that_do_not_fit_the_config_are_refused(folders, tmp_path):
    bad = tmp_path / "bad"
    llama(0).save_pretrained(bad)
    cfg = (bad / "config.json").read_text().replace('"num_hidden_layers": 2',
                                                    '"num_hidden_layers": 3')
    (bad / "config.json").write_text(cfg)
    with pytest.raises(CheckpointMismatchError, match="missing keys: model.layers.2"):
        load_folder(bad)


def test_python_api_on_from_pretrained_models(folders):
    a = LlamaForCausalLM.from_pretrained(folders["llama0"])
    b = LlamaForCausalLM.from_pretrained(folders["llama1"])
    w = windows(encode(folders["text"]), 16)
    train, held = lm_batches(w[:24], 8), lm_batches(w[-16:], 8)
    result = autobasin.auto_rebasin(a, b, example_inputs={"input_ids": w[:2]},
                                    method="activation", data=train, progress=False)
    ids = w[-4:]
    assert (logits(result.model, ids) - logits(b, ids)).abs().max() < 1e-4
    res = autobasin.loss_barrier(a, result.model, held, lambdas=3, progress=False)
    assert res.losses[0] == pytest.approx(lm_eval(a, held)[0], rel=1e-5)
    assert res.losses[-1] == pytest.approx(lm_eval(b, held)[0], rel=1e-4)
    assert res.accuracies is not None and len(res.losses) == 3


def test_a_masked_lm_batch_is_scored_with_the_models_own_loss():
    from transformers import BertConfig, BertForMaskedLM
    from autobasin.barrier import evaluate
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                       num_attention_heads=4, intermediate_size=64)).eval()
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    labels[0, 7] = ids[0, 7]
    masked = ids.clone()
    masked[labels != -100] = 0
    loss, _ = evaluate(model, [{"input_ids": masked, "labels": labels}])
    with torch.no_grad():
        own = model(input_ids=masked, labels=labels).loss
    assert loss == pytest.approx(float(own), rel=1e-5)
