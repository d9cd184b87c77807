"""torch.distributed: every data-driven function treats each rank's data as its shard
and returns, on every rank, what one process given every batch returns. Two gloo
processes on the CPU, launched with torchrun (``tests/dist_worker.py``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dist_worker
from autobasin.distributed import shard, world

HERE = Path(__file__).resolve().parent


def _close(x, y, what):
    if isinstance(x, dict):
        assert x.keys() == y.keys(), what
        for k in x:
            _close(x[k], y[k], f"{what}[{k}]")
    elif isinstance(x, (list, tuple)):
        assert len(x) == len(y), what
        for i, (u, v) in enumerate(zip(x, y)):
            _close(u, v, f"{what}[{i}]")
    elif isinstance(x, torch.Tensor):
        if x.is_floating_point():
            torch.testing.assert_close(x.double(), y.double(), rtol=1e-5, atol=1e-6, msg=what)
        else:
            assert torch.equal(x, y), what
    elif isinstance(x, float):
        assert x == pytest.approx(y, rel=1e-5, abs=1e-6), what
    else:
        assert x == y, what


def test_no_process_group_is_one_process():
    assert world() is None
    assert list(shard(range(5))) == [0, 1, 2, 3, 4] and len(shard(range(5))) == 5
    assert list(shard(range(7), (1, 3))) == [1, 4] and len(shard(range(7), (1, 3))) == 2


def test_two_gloo_ranks_equal_one_process(tmp_path):
    torch.manual_seed(0)
    a, b, data = dist_worker.build()
    reference = dist_worker.run_all(a, b, data, data[0][0][:2])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", str(HERE / "dist_worker.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [(got["world"], got["local_batches"]) for got in ranks] == [((0, 2), 4), ((1, 2), 3)]
    for r, got in enumerate(ranks):
        # the same permutations (exactly) and statistics (to 1e-5) as one process
        _close(got["result"], reference, f"rank {r}")
    assert reference["batches"] == 7 and reference["n_predicted"] == 42
    # STE: data-parallel steps; one process whose step-t batch joins the ranks' step-t batches
    ma, mb, ste_data = dist_worker.mlps()
    joined = [tuple(torch.cat(parts) for parts in zip(ste_data[i], ste_data[i + 1])) for i in (0, 2)]
    ste_reference = dist_worker.run_ste(ma, mb, joined)
    assert ste_reference["steps"] == 6
    for r, got in enumerate(ranks):
        _close(got["ste"], ste_reference, f"rank {r} STE")


MLP = ("import torch.nn as nn\n"
       "def mlp():\n"
       "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),\n"
       "                         nn.Linear(32, 10))\n")


def test_cli_under_torchrun_shards_data_and_writes_once(tmp_path):
    """``torchrun --nproc-per-node 2 -m autobasin align/barrier --data digits``: each rank
    reads every other batch; the files (written once, by rank 0) equal one process's."""
    from autobasin import build_model, load_state_dict, save_state_dict
    (tmp_path / "models.py").write_text(MLP)
    factory = f"{tmp_path / 'models.py'}:mlp"
    for seed in (0, 1):
        torch.manual_seed(seed)
        save_state_dict(build_model(factory).state_dict(), tmp_path / f"m{seed}.safetensors")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))

    def cli(prefix, *args):
        proc = subprocess.run([sys.executable, *prefix, "-m", "autobasin", *map(str, args)],
                              capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    common = [factory, "--a", tmp_path / "m0.safetensors", "--b", tmp_path / "m1.safetensors",
              "--data", "digits", "--batch-size", "100", "-q"]
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    outputs = {}
    for label, prefix in (("one", []), ("two", torchrun)):
        out = cli(prefix, "align", *common, "--method", "activation", "--out", tmp_path / f"{label}.safetensors")
        assert out.count(f"wrote {tmp_path / label}.safetensors") == 1  # one report, one writer
        cli(prefix, "barrier", *common, "--lambdas", "3", "--json", tmp_path / f"{label}.json")
        outputs[label] = (load_state_dict(tmp_path / f"{label}.safetensors"),
                          json.loads((tmp_path / f"{label}.json").read_text()))
    (sd1, doc1), (sd2, doc2) = outputs["one"], outputs["two"]
    assert "rank" not in doc1["data"] and doc2["data"].endswith("(rank 0 of 2: one batch in 2)")
    for k in sd1:
        assert torch.equal(sd1[k], sd2[k]), k  # the same permutations
    for method in ("naive", "weight"):
        assert doc2[method]["losses"] == pytest.approx(doc1[method]["losses"], rel=1e-5)
