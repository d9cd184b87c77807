"""The command line end to end, through real files: inspect, align, barrier, merge, demo,
and every expected failure (exit code, one-line message naming the culprit)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autobasin import PermutationSpec, apply_permutation
from helpers import one_thread_per_module, run_cli  # noqa: F401 - the fixture: one thread
from autobasin.io import (CheckpointMismatchError, CheckpointReadError, load_into, load_perms,
                          load_state_dict, save_perms, save_state_dict)
from autobasin.models import ModelSpecError, build_model
from autobasin.testing import randomize_state_

MLP_SOURCE = '''
from collections import OrderedDict
from torch import nn


def mlp(hidden=32, num_classes=10):
    return nn.Sequential(OrderedDict(
        flatten=nn.Flatten(), fc1=nn.Linear(64, hidden), relu1=nn.ReLU(),
        fc2=nn.Linear(hidden, hidden), relu2=nn.ReLU(), fc3=nn.Linear(hidden, num_classes)))
'''


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path | str]:
    """A file-factory MLP with two trained checkpoints, a narrower one, and test_resnet pair."""
    from autobasin.data import digits_split
    from autobasin.demo import train_classifier

    root = tmp_path_factory.mktemp("cli")
    (root / "models.py").write_text(MLP_SOURCE)
    mlp = f"{root / 'models.py'}:mlp"
    train, _ = digits_split(seed=0)
    out: dict[str, Path | str] = {"root": root, "mlp": mlp}
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = build_model(mlp)
        train_classifier(model, train, epochs=2, lr=3e-3, batch_size=64, seed=seed)
        out[f"mlp{seed}"] = model
    # A as safetensors; B as a training checkpoint: wrapped, DataParallel prefix, fp16
    save_state_dict(out["mlp0"].state_dict(), root / "a.safetensors")
    torch.save({"epoch": 2, "state_dict": {f"module.{k}": v.half()
                                           for k, v in out["mlp1"].state_dict().items()}},
               root / "b.pt")
    out["a"], out["b"] = root / "a.safetensors", root / "b.pt"
    narrow = build_model(mlp, hidden=16)
    torch.save(narrow.state_dict(), root / "narrow.pt")
    out["narrow"] = root / "narrow.pt"
    for name, seed, fname in (("ra", 0, "ra.pth"), ("rb", 1, "rb.safetensors")):
        torch.manual_seed(seed)
        model = randomize_state_(build_model("timm:test_resnet"), seed=seed, scale=0.05)
        save_state_dict(model.state_dict(), root / fname)
        out[name] = root / fname
    return out


run = run_cli


def outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


# ------------------------------------------------------------------- inspect
def test_inspect_mlp_json_and_plot(files, tmp_path, capsys):
    code, out, err = run(capsys, "inspect", files["mlp"], "--json", tmp_path / "spec.json",
                         "--plot", tmp_path / "spec.png", "--quiet")
    assert code == 0, err
    assert "fc1:out" in out and "fc2:out" in out and "coverage" in out and "verified" in out
    spec = PermutationSpec.from_json((tmp_path / "spec.json").read_text())
    assert set(spec.groups) == {"fc1:out", "fc2:out"}
    assert spec.groups["fc1:out"].size == 32
    png = (tmp_path / "spec.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


def test_inspect_timm(files, tmp_path, capsys):
    code, out, err = run(capsys, "inspect", "timm:test_resnet", "--input-size", 3, 64, 64,
                         "--json", tmp_path / "r.json",
                         "--plot", tmp_path / "r.png", "-q")
    assert code == 0, err
    assert "blocked ops" in out and "layer4.0.conv2:out" in out
    spec = PermutationSpec.from_json((tmp_path / "r.json").read_text())
    assert len(spec.groups) >= 10 and spec.coverage() > 0.99
    assert (tmp_path / "r.png").stat().st_size > 10_000


def test_console_script_subprocess(files, tmp_path):
    """``python -m autobasin.cli`` as a real process: the exit code and a one-line error."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    bad = subprocess.run([sys.executable, "-m", "autobasin.cli", "align", str(files["mlp"]),
                          "--a", str(files["a"]), "--b", str(files["narrow"]),
                          "--out", str(tmp_path / "o.safetensors")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 3, bad.stderr
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("autobasin: error: ") and "narrow.pt" in last and "'fc1.weight'" in last
    assert "Traceback" not in bad.stderr and not (tmp_path / "o.safetensors").exists()


def _mlp_spec(layers: int, hidden: int = 4):
    """A hand-made spec of an MLP with ``layers`` Linear layers: one group per hidden layer."""
    from autobasin.spec import Group, Member, PermutationSpec, TensorInfo
    tensors, groups = {}, []
    for i in range(layers):
        tensors[f"layers.{i}.weight"] = TensorInfo((hidden, hidden), True, True)
        tensors[f"layers.{i}.bias"] = TensorInfo((hidden,), True, True)
    for i in range(layers - 1):
        groups.append(Group(f"layers.{i}:out", hidden, [
            Member(f"layers.{i}.weight", 0, 0, (hidden,), (1,), 0),
            Member(f"layers.{i}.bias", 0, 0, (hidden,), (1,), 0),
            Member(f"layers.{i + 1}.weight", 1, 0, (hidden,), (1,), 0)]))
    return PermutationSpec(groups, tensors)


def _assert_readable(fig, path):
    """The saved PNG has a sane size and aspect; every label is 8 pt or more, inside the
    figure, and overlaps no other label."""
    import numpy as np
    from PIL import Image
    width, height = Image.open(path).size
    assert 300 <= width <= 8000 and 300 <= height <= 8000, (width, height)
    assert width / height <= 4 and height / width <= 4, (width, height)
    renderer = fig.canvas.get_renderer()
    labels = [t for ax in fig.axes for t in ax.texts]
    assert labels and all(t.get_fontsize() >= 8 for t in labels)
    assert all(t.get_fontsize() >= 8 for lg in fig.legends for t in lg.get_texts())
    assert all(t.get_fontsize() >= 8 for t in fig.texts)
    boxes = np.array([tuple(t.get_window_extent(renderer).extents) for t in labels])
    x0, y0, x1, y1 = boxes.T
    assert x0.min() >= 0 and y0.min() >= 0 and x1.max() <= width and y1.max() <= height
    overlap = ((x0[:, None] < x1[None, :]) & (x0[None, :] < x1[:, None])
               & (y0[:, None] < y1[None, :]) & (y0[None, :] < y1[:, None]))
    np.fill_diagonal(overlap, False)
    assert not overlap.any(), [labels[i].get_text() for i in np.argwhere(overlap)[0]]


def test_spec_plot_of_a_vit_stays_readable(tmp_path):
    """vit_tiny (49 groups over 152 tensors) once made a 3230x470 px plot with 5 pt text."""
    from autobasin.infer import infer_spec
    from autobasin.plots import plot_spec
    from autobasin.testing import create
    spec = infer_spec(create("vit_tiny_patch16_224"))
    assert len(spec.groups) >= 40
    fig = plot_spec(spec, tmp_path / "vit.png", title="timm:vit_tiny_patch16_224")
    _assert_readable(fig, tmp_path / "vit.png")


@pytest.mark.parametrize("layers", [3, 80, 1000])
def test_spec_plot_size_scales_with_the_model(tmp_path, layers):
    from autobasin.plots import MAX_PANELS, MAX_ROWS, plot_spec
    fig = plot_spec(_mlp_spec(layers), tmp_path / "s.png")
    _assert_readable(fig, tmp_path / "s.png")
    heading = fig.texts[0].get_text()
    if 2 * layers > MAX_PANELS * MAX_ROWS:   # too many to label: the title says what is drawn
        assert f"the first {MAX_PANELS * MAX_ROWS} of {2 * layers} tensors drawn" in heading
    else:
        assert "drawn" not in heading


def test_coverage_is_printed_one_way(files, tmp_path, capsys):
    """inspect and align print the same coverage, with 4 decimals, rounded down."""
    import re
    from autobasin.spec import format_coverage
    assert [format_coverage(c) for c in (1.0, 0.99996, 0.5, 0.0)] == \
        ["1.0000", "0.9999", "0.5000", "0.0000"]
    code, out_inspect, err = run(capsys, "inspect", files["mlp"], "-q", "--no-verify")
    assert code == 0, err
    code, out_align, err = run(capsys, "align", files["mlp"], "--a", files["a"], "--b",
                               files["b"], "--out", tmp_path / "o.safetensors", "-q")
    assert code == 0, err
    shown = re.findall(r"coverage:? (\S+)", out_inspect + out_align)
    assert len(shown) == 3 and set(shown) == {"1.0000"}, shown


def test_progress_on_stderr_unless_quiet(files, tmp_path, capsys):
    out = tmp_path / "merged.safetensors"
    code, stdout, err = run(capsys, "merge", files["mlp"], files["a"], files["b"], "--out", out)
    assert code == 0, err
    for line in ("building ", "loading ", "inferring the spec", "matching model 0",
                 "matching model 1", "verifying", f"writing {out}"):
        assert line in err, (line, err)
    assert "done in" in err and "matching model" not in stdout and f"wrote {out}" in stdout
    code, stdout, err = run(capsys, "merge", files["mlp"], files["a"], files["b"], "--out", out,
                            "-q")
    assert code == 0 and err == "" and f"wrote {out}" in stdout
    code, stdout, err = run(capsys, "inspect", files["mlp"], "--plot", tmp_path / "s.png")
    assert code == 0, err
    assert f"inferring the spec of {files['mlp']} ..." in err
    assert f"inferring the spec of {files['mlp']}: done in " in err
    assert f"drawing {tmp_path / 's.png'}" in err and "inferring" not in stdout
    code, stdout, err = run(capsys, "inspect", files["mlp"], "--plot", tmp_path / "s.png", "-q")
    assert code == 0 and err == "" and "coverage" in stdout


# --------------------------------------------------------------------- align
def test_align_timm_safetensors(files, tmp_path, capsys):
    out = tmp_path / "aligned" / "rb_aligned.safetensors"
    code, stdout, err = run(capsys, "align", "timm:test_resnet", "--a", files["ra"],
                            "--b", files["rb"], "--out", out, "-q", "--device", "cpu",
                            "--input-size", 3, 64, 64)
    assert code == 0, err
    assert "verified" in stdout
    perms_path = tmp_path / "aligned" / "rb_aligned.perms.safetensors"
    assert out.is_file() and perms_path.is_file()

    model = build_model("timm:test_resnet")
    a = load_into(build_model("timm:test_resnet"), load_state_dict(files["ra"]))
    b = load_into(build_model("timm:test_resnet"), load_state_dict(files["rb"]))
    aligned_sd = load_state_dict(out)
    aligned = load_into(model, aligned_sd)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(outputs(aligned, x), outputs(b, x), rtol=1e-4, atol=1e-5)

    def dist(m):
        with torch.no_grad():
            return sum(float((p - q).pow(2).sum()) for p, q in zip(a.parameters(), m.parameters()))
    assert dist(aligned) < dist(b)
    # the permutations reproduce the file from B
    from autobasin.infer import infer_spec
    spec = infer_spec(a, torch.randn(2, 3, 64, 64))
    again = apply_permutation(spec, load_perms(perms_path), load_state_dict(files["rb"]))
    for k, v in aligned_sd.items():
        assert torch.equal(v, again[k]), k


def test_align_low_memory_writes_the_same_file(files, tmp_path, capsys):
    """--low-memory (memory-mapped inputs, streamed output, the model built on meta)
    writes what the in-memory path writes; it refuses what it does not do."""
    common = ["timm:test_resnet", "--a", files["ra"], "--b", files["rb"], "-q",
              "--input-size", 3, 64, 64]
    full, lean = tmp_path / "full.safetensors", tmp_path / "lean.safetensors"
    assert run(capsys, "align", *common, "--out", full)[0] == 0
    code, stdout, err = run(capsys, "align", *common, "--out", lean, "--low-memory")
    assert code == 0, err
    assert "verified" in stdout and "memory" not in err.lower()
    a, b = load_state_dict(full), load_state_dict(lean)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    pa, pb = (load_perms(tmp_path / f"{n}.perms.safetensors") for n in ("full", "lean"))
    assert set(pa) == set(pb) and all(torch.equal(pa[g], pb[g]) for g in pa)
    for bad, words in ((["--out", tmp_path / "x.pt", "--low-memory"], "safetensors"),
                       (["--out", lean, "--low-memory", "--method", "activation"], "--method weight")):
        code, _, err = run(capsys, "align", *common, *bad)
        assert code != 0 and words in err, err


def test_merge_low_memory_averages_the_aligned_checkpoints(files, tmp_path, capsys):
    """merge --low-memory: the first checkpoint and the second aligned to it (what align
    writes), averaged; only weight matching without data."""
    common = ["timm:test_resnet", "-q", "--input-size", 3, 64, 64]
    aligned = tmp_path / "aligned.safetensors"
    assert run(capsys, "align", *common, "--a", files["ra"], "--b", files["rb"], "--out", aligned)[0] == 0
    out = tmp_path / "merged.safetensors"
    code, stdout, err = run(capsys, "merge", "timm:test_resnet", files["ra"], files["rb"], "-q",
                            "--input-size", 3, 64, 64, "--out", out, "--low-memory")
    assert code == 0, err
    assert "verified" in stdout
    merged, a, b = (load_state_dict(p) for p in (out, files["ra"], aligned))
    for k, v in a.items():
        want = (v.float() + b[k].float()) / 2 if v.is_floating_point() else v
        torch.testing.assert_close(merged[k], want.to(v.dtype), rtol=1e-6, atol=1e-7)
    code, _, err = run(capsys, "merge", "timm:test_resnet", files["ra"], files["rb"], "--out", out,
                       "--low-memory", "--method", "activation")
    assert code != 0 and "--method weight" in err


def test_align_mlp_pt_keeps_dtype(files, tmp_path, capsys):
    out = tmp_path / "b_aligned.pt"
    perms = tmp_path / "perms.json"
    code, stdout, err = run(capsys, "align", files["mlp"], "--a", files["a"], "--b", files["b"],
                            "--out", out, "--perms", perms, "--seed", "3", "-q")
    assert code == 0, err
    sd = torch.load(out, weights_only=True)
    assert all(v.dtype == torch.float16 for v in sd.values())   # B was stored in fp16
    assert set(json.loads(perms.read_text())["perms"]) == {"fc1:out", "fc2:out"}
    b = load_into(build_model(files["mlp"]), load_state_dict(files["b"]))
    aligned = load_into(build_model(files["mlp"]), sd)
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(outputs(aligned, x), outputs(b, x))
    a = files["mlp0"]
    before = float((a.fc1.weight - b.fc1.weight).norm().detach())
    after = float((a.fc1.weight - aligned.fc1.weight).norm().detach())
    assert after < before
    line = next(l for l in stdout.splitlines() if l.startswith("L2 distance"))
    d_before, d_after = (float(t) for t in line.replace("->", " ").split()[-4::3])
    assert d_after < d_before


def test_align_wrong_spec_fails_verification(files, tmp_path, capsys):
    """A spec that forgets a member (fc2's input columns) breaks B: exit code 4, nothing written."""
    code, _, err = run(capsys, "inspect", files["mlp"], "--json", tmp_path / "spec.json", "-q",
                       "--no-verify")
    assert code == 0, err
    doc = json.loads((tmp_path / "spec.json").read_text())
    group = next(g for g in doc["groups"] if g["name"] == "fc1:out")
    group["members"] = [m for m in group["members"] if m["param"] != "fc2.weight"]
    (tmp_path / "wrong.json").write_text(json.dumps(doc))
    out = tmp_path / "o.safetensors"
    code, _, err = run(capsys, "align", files["mlp"], "--a", files["a"], "--b", files["b"],
                       "--out", out, "--spec", tmp_path / "wrong.json", "-q")
    assert code == 4, err
    assert "computes something else" in err and "Traceback" not in err and not out.exists()
    (tmp_path / "other.json").write_text(json.dumps({**doc, "groups": [
        {**group, "members": [{**group["members"][0], "param": "fc9.weight"}]}]}))
    code, _, err = run(capsys, "align", files["mlp"], "--a", files["a"], "--b", files["b"],
                       "--out", out, "--spec", tmp_path / "other.json", "-q")
    assert code == 3 and "'fc9.weight'" in err


def test_align_tol_stops_early_and_stays_exact(files, tmp_path, capsys):
    runs = {}
    for tol in ("0", "0.5"):
        out = tmp_path / f"tol{tol}.safetensors"
        code, stdout, err = run(capsys, "align", "timm:test_resnet", "--a", files["ra"],
                                "--b", files["rb"], "--out", out, "--tol", tol, "--device", "cpu",
                                "--input-size", 3, 64, 64)
        assert code == 0, err
        runs[tol] = int(stdout.split(" sweeps")[0].rsplit(" ", 1)[-1])
        assert "verified" in stdout  # B's function is kept either way
    assert runs["0.5"] < runs["0"]  # a large tol ends after the first sweeps
    out = tmp_path / "o.safetensors"
    code, _, err = run(capsys, "align", files["mlp"], "--a", files["a"], "--b", files["b"],
                       "--out", out, "--tol", "0.01", "--method", "activation", "--data", "digits")
    assert code == 2 and "--tol applies to weight matching only" in err and not out.exists()
    code, _, err = run(capsys, "align", files["mlp"], "--a", files["a"], "--b", files["b"],
                       "--out", out, "--tol", "-1")
    assert code == 2 and "--tol must be" in err

@pytest.mark.parametrize("method", ["activation"])
def test_align_data_method(files, tmp_path, capsys, method):
    out = tmp_path / "b_aligned.safetensors"
    code, _, err = run(capsys, "align", files["mlp"], "--a", files["a"], "--b", files["b"],
                       "--out", out, "--method", method, "-q")
    assert code == 2 and f"--method {method} needs --data" in err and not out.exists()
    code, stdout, err = run(capsys, "align", files["mlp"], "--a", files["a"], "--b", files["b"],
                            "--out", out, "--method", method, "--data", "digits", "-q")
    assert code == 0, err
    b = load_into(build_model(files["mlp"]), load_state_dict(files["b"]))
    aligned = load_into(build_model(files["mlp"]), load_state_dict(out))
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(outputs(aligned, x), outputs(b, x))


# ------------------------------------------------------------------- barrier
def test_barrier_digits(files, tmp_path, capsys):
    code, stdout, err = run(capsys, "barrier", files["mlp"], "--a", files["a"], "--b", files["b"],
                            "--data", "digits", "--lambdas", "5", "--plot", tmp_path / "b.png",
                            "--json", tmp_path / "b.json", "-q")
    assert code == 0, err
    assert "| naive |" in stdout and "| weight matching |" in stdout
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    doc = json.loads((tmp_path / "b.json").read_text())
    naive, aligned = doc["naive"], doc["weight"]
    assert len(naive["losses"]) == len(aligned["losses"]) == 5
    # same endpoints (aligned B computes what B computes), lower barrier after alignment
    assert aligned["losses"][0] == pytest.approx(naive["losses"][0])
    assert aligned["losses"][-1] == pytest.approx(naive["losses"][-1], rel=1e-4)
    assert aligned["barrier"] < naive["barrier"]


def test_barrier_module_function_data(files, tmp_path, capsys):
    (tmp_path / "mydata.py").write_text(
        "import torch\nfrom torch.utils.data import TensorDataset\n"
        "def data(split='heldout'):\n"
        "    g = torch.Generator().manual_seed(0 if split == 'train' else 1)\n"
        "    return TensorDataset(torch.randn(20, 64, generator=g),\n"
        "                         torch.randint(0, 10, (20,), generator=g))\n")
    code, stdout, err = run(capsys, "barrier", files["mlp"], "--a", files["a"], "--b", files["b"],
                            "--data", f"{tmp_path / 'mydata.py'}:data", "--lambdas", "3", "-q")
    assert code == 0, err
    assert "mydata.py:data (heldout)" in stdout


def test_barrier_image_folder_reset_bn(files, tmp_path, capsys):
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("cat", "dog"):
            (tmp_path / "imgs" / split / label).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(
                    tmp_path / "imgs" / split / label / f"{i}.png")
    code, stdout, err = run(capsys, "barrier", "timm:test_resnet", "--a", files["ra"],
                            "--b", files["rb"], "--data", tmp_path / "imgs", "--input-size", 3, 32,
                            32, "--lambdas", 3, "--reset-bn", "-q", "--batch-size", 4)
    assert code == 0, err
    assert "imgs/val (4 images, 2 classes, resized to 3x32x32)" in stdout
    assert "BatchNorm statistics reset" in stdout


def test_mnist_idx_data(tmp_path):
    import gzip
    import struct
    from autobasin.data import MNIST_IMAGES, MNIST_LABELS, resolve_data
    n = 8_010
    for name, shape in ((MNIST_IMAGES, (n, 28, 28)), (MNIST_LABELS, (n,))):
        header = struct.pack(">HBB", 0, 0x08, len(shape)) + struct.pack(f">{len(shape)}I", *shape)
        with gzip.open(tmp_path / name, "wb", compresslevel=1) as f:
            f.write(header + bytes(int(torch.tensor(shape).prod())))
    data = resolve_data(str(tmp_path), torch.nn.Identity(), split="heldout", batch_size=16)
    assert "heldout split (10 images)" in data.description and data.has_train_split
    x, y = next(iter(data.eval))
    assert x.shape == (10, 1, 28, 28) and y.shape == (10,)


# --------------------------------------------------------------- merge, demo
def test_merge(files, tmp_path, capsys):
    out = tmp_path / "merged.safetensors"
    code, _, err = run(capsys, "merge", files["mlp"], files["a"], files["b"], "--out", out, "-q")
    assert code == 0, err
    load_into(build_model(files["mlp"]), load_state_dict(out))
    # with scaled permutations (ReLU units): verified as it merges, and a different file
    scaled = tmp_path / "scaled.safetensors"
    code, stdout, err = run(capsys, "merge", files["mlp"], files["a"], files["b"], "--out",
                            scaled, "--symmetries", "scale", "-q")
    assert code == 0, err
    a, b = load_state_dict(out), load_state_dict(scaled)
    assert not torch.allclose(a["fc1.weight"], b["fc1.weight"])


def test_align_and_merge_with_spec_verify_or_refuse(files, tmp_path, capsys):
    """align and merge verify what they write (a line says so); merge takes --spec too, and
    a spec that changes the function (fc1's outputs permuted, fc2's inputs not) is refused
    with exit code 4 naming the checkpoint, before anything is written."""
    code, _, err = run(capsys, "inspect", files["mlp"], "--json", tmp_path / "spec.json", "-q",
                       "--no-verify")
    assert code == 0, err
    doc = json.loads((tmp_path / "spec.json").read_text())
    group = next(g for g in doc["groups"] if g["name"] == "fc1:out")
    group["members"] = [m for m in group["members"] if m["param"] != "fc2.weight"]
    (tmp_path / "wrong.json").write_text(json.dumps(doc))
    out = tmp_path / "o.safetensors"
    for command in (["align", files["mlp"], "--a", files["a"], "--b", files["b"]],
                    ["merge", files["mlp"], files["a"], files["b"]]):
        code, stdout, err = run(capsys, *command, "--out", out, "--spec", tmp_path / "spec.json",
                                "-q")
        assert code == 0, err
        line = next(l for l in stdout.splitlines() if l.startswith("verified:"))
        assert float(line.rstrip(")").split()[-1]) <= 1e-4
        out.unlink()
    code, _, err = run(capsys, "merge", files["mlp"], files["a"], files["b"], "--out", out,
                       "--spec", tmp_path / "wrong.json", "-q")
    assert code == 4, err
    assert "model 0" in err or "model 1" in err
    assert "computes something else" in err and "Traceback" not in err and not out.exists()
    narrow = tmp_path / "narrow.json"
    code, _, err = run(capsys, "inspect", files["mlp"], "--model-kwargs", "hidden=16", "--json",
                       narrow, "-q", "--no-verify")
    assert code == 0, err
    code, _, err = run(capsys, "merge", files["mlp"], files["a"], files["b"], "--out", out,
                       "--spec", narrow, "-q")
    assert code == 3 and "'fc1.weight'" in err and "spec was made for" in err, err
    assert not out.exists()


def test_merge_by_activation_matching(files, tmp_path, capsys):
    out = tmp_path / "merged.safetensors"
    code, _, err = run(capsys, "merge", files["mlp"], files["a"], files["b"], "--out", out,
                       "--method", "activation", "-q")
    assert code == 2 and "--method activation needs --data" in err and not out.exists()
    code, stdout, err = run(capsys, "merge", files["mlp"], files["a"], files["b"], "--out", out,
                            "--method", "activation", "--data", "digits")
    assert code == 0, err
    assert "activation matching" in stdout
    load_into(build_model(files["mlp"]), load_state_dict(out))


def test_merge_calls_merge_many(files, tmp_path, capsys, monkeypatch):
    """merge loads every checkpoint, hands them to merge_many with the options, saves its result."""
    import copy

    import autobasin.merge
    seen = {}

    def fake_merge_many(models, method="weight", seed=0, max_rounds=10, repair=None, data=None,
                        **kwargs):
        seen.update(n=len(models), method=method, seed=seed, max_rounds=max_rounds, repair=repair)
        sds = [m.state_dict() for m in models]
        merged = copy.deepcopy(models[0])
        merged.load_state_dict({k: sum(sd[k] for sd in sds) / len(sds) for k in sds[0]})
        return merged

    monkeypatch.setattr(autobasin.merge, "merge_many", fake_merge_many)
    out = tmp_path / "merged.safetensors"
    code, _, err = run(capsys, "merge", files["mlp"], files["a"], files["b"], files["a"],
                       "--out", out, "--seed", 5, "--max-rounds", 3, "-q")
    assert code == 0, err
    assert seen == {"n": 3, "method": "weight", "seed": 5, "max_rounds": 3, "repair": None}
    merged = load_state_dict(out)
    assert merged["fc1.weight"].dtype == torch.float32   # the first checkpoint's dtype
    load_into(build_model(files["mlp"]), merged)


def test_merge_and_barrier_with_repair(files, tmp_path, capsys):
    common = [files["mlp"], files["a"], files["b"], "-q"]
    out = tmp_path / "merged.safetensors"
    code, _, err = run(capsys, "merge", *common, "--out", out, "--repair", "repair")
    assert code == 2 and "--repair needs --data" in err and not out.exists()
    code, _, err = run(capsys, "merge", *common, "--out", out, "--repair", "repair",
                       "--reset-bn", "--data", "digits")
    assert code == 2 and "drop --reset-bn" in err and not out.exists()
    code, stdout, err = run(capsys, "merge", *common, "--out", out, "--repair", "repair",
                            "--data", "digits")
    assert code == 0, err
    assert "REPAIRed" in stdout
    plain = tmp_path / "plain.safetensors"
    assert run(capsys, "merge", *common, "--out", plain)[0] == 0
    repaired, merged = load_state_dict(out), load_state_dict(plain)
    assert set(repaired) == set(merged)                         # same architecture
    assert not torch.allclose(repaired["fc1.weight"], merged["fc1.weight"])  # hidden layer fixed

    code, stdout, err = run(capsys, "barrier", files["mlp"], "--a", files["a"], "--b", files["b"],
                            "--data", "digits", "--lambdas", "3", "--repair", "repair",
                            "--json", tmp_path / "r.json", "-q")
    assert code == 0, err
    assert "every point REPAIRed" in stdout
    doc = json.loads((tmp_path / "r.json").read_text())
    # REPAIR leaves an endpoint as it is: both paths start at A's loss
    assert doc["weight"]["losses"][0] == pytest.approx(doc["naive"]["losses"][0], rel=1e-5)


def test_demo_quick(tmp_path, capsys):
    code, stdout, err = run(capsys, "demo", "--quick", "--epochs", 1, "--out", tmp_path / "demo",
                             "--lambdas", "5")
    assert code == 0, err
    assert (tmp_path / "demo" / "barrier.png").is_file()
    assert "naive" in stdout


# ------------------------------------------------------------------ failures
def _bad_files(files, tmp_path):
    mlp_sd = files["mlp0"].state_dict()
    renamed = {("fc2.w" if k == "fc2.weight" else k): v for k, v in mlp_sd.items()}
    save_state_dict(renamed, tmp_path / "renamed.safetensors")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    good = (Path(files["a"])).read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    (tmp_path / "corrupt.pt").write_bytes(b"this is not a checkpoint")


@pytest.mark.parametrize("argv, code, needles", [
    (["align", "{mlp}", "--a", "{a}", "--b", "{tmp}/missing.pt", "--out", "{tmp}/o.safetensors"],
     2, ["missing.pt", "no such file"]),
    (["align", "{mlp}", "--a", "{a}", "--b", "{narrow}", "--out", "{tmp}/o.safetensors"],
     3, ["narrow.pt", "'fc1.weight' has shape (16, 64) in the checkpoint but (32, 64)"]),
    (["align", "{mlp}", "--a", "{a}", "--b", "{rb}", "--out", "{tmp}/o.safetensors"],
     3, ["rb.safetensors", "missing from it: 'fc1.weight'", "92 of its keys are not in the model"]),
    (["align", "{mlp}", "--a", "{tmp}/renamed.safetensors", "--b", "{b}", "--out", "{tmp}/o.pt"],
     3, ["renamed.safetensors", "'fc2.weight'", "'fc2.w'"]),
    (["align", "{mlp}", "--a", "{a}", "--b", "{tmp}/corrupt.safetensors", "--out", "{tmp}/o.pt"],
     2, ["corrupt.safetensors", "not a readable safetensors file"]),
    (["align", "{mlp}", "--a", "{tmp}/truncated.safetensors", "--b", "{b}", "--out", "{tmp}/o.pt"],
     2, ["truncated.safetensors"]),
    (["barrier", "{mlp}", "--a", "{a}", "--b", "{tmp}/corrupt.pt", "--data", "digits"],
     2, ["corrupt.pt", "not a PyTorch checkpoint"]),
    (["inspect", "timm:resnet19"], 2, ["unknown timm model 'resnet19'", "resnet18"]),
    (["inspect", "torchvision:resnt18"], 2, ["unknown torchvision model", "resnet18"]),
    (["inspect", "{root}/models.py:mlpp"], 2, ["models.py has no factory named 'mlpp'", "mlp"]),
    (["inspect", "{tmp}/nope.py:f"], 2, ["no such file", "nope.py"]),
    (["barrier", "{mlp}", "--a", "{a}", "--b", "{b}", "--data", "{tmp}/no_such_folder"],
     2, ["no_such_folder", "no such folder"]),
    (["barrier", "timm:test_resnet", "--a", "{ra}", "--b", "{rb}", "--data", "digits"],
     2, ["cannot run on a batch of DATA digits", "(128, 1, 8, 8)", "at layer 'conv1.0'"]),
    (["align", "{mlp}", "--a", "{a}", "--b", "{b}", "--out", "{tmp}/o.pt", "--device", "nonsense"],
     2, ["--device"]),
    (["align", "{mlp}", "--a", "{a}", "--b", "{b}", "--out", "{tmp}/o.pt", "--method", "nope"],
     2, ["invalid choice: 'nope'"]),
    (["align", "{mlp}", "--a", "{a}", "--b", "{b}", "--out", "{tmp}/o.pt", "--device", "cuda:99"],
     2, ["--device cuda:99"]),
    (["merge", "{mlp}", "{a}", "{narrow}", "--out", "{tmp}/o.safetensors"],
     3, ["narrow.pt", "'fc1.weight' has shape (16, 64)"]),
    (["merge", "{mlp}", "{a}", "{tmp}/corrupt.pt", "--out", "{tmp}/o.safetensors"],
     2, ["corrupt.pt"]),
    (["merge", "{mlp}", "{a}", "--out", "{tmp}/o.safetensors"], 2, ["at least 2 checkpoints"]),
    (["align", "{mlp}", "--a", "{a}", "--b", "{b}", "--out", "{tmp}"], 2, ["is a folder"]),
])
def test_failures(files, tmp_path, capsys, argv, code, needles):
    _bad_files(files, tmp_path)
    subs = {k: str(v) for k, v in files.items() if isinstance(v, (str, Path))}
    subs["tmp"] = str(tmp_path)
    got, out, err = run(capsys, *[a.format(**subs) for a in argv])
    assert got == code, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert "Traceback" not in err
    if code != 2 or "invalid choice" not in err:  # argparse prints its own usage
        assert err.strip().splitlines()[-1].startswith("autobasin: error: ")
    assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "o.pt").exists()


# --------------------------------------------------------------- io, models
def test_io_layouts_and_atomic_save(tmp_path):
    sd = {"w": torch.randn(3, 2).bfloat16(), "b": torch.arange(3)}
    tied = {"emb": sd["w"], "head": sd["w"], "view": sd["w"].float()[:, 0]}
    save_state_dict(tied, tmp_path / "tied.safetensors")   # shared and partial tensors are cloned
    back = load_state_dict(tmp_path / "tied.safetensors")
    assert back["emb"].dtype == torch.bfloat16 and torch.equal(back["head"], sd["w"])
    for layout in ({"model": {"_orig_mod.module.w": sd["w"]}, "optimizer": {}},
                   {"state_dict_ema": {"w": sd["w"]}}, {"module.w": sd["w"]}):
        torch.save(layout, tmp_path / "x.pth")
        assert list(load_state_dict(tmp_path / "x.pth")) == ["w"]
    torch.save({"state_dict": {"w": sd["w"]}, "state_dict_ema": {"w": sd["w"] * 0}},
               tmp_path / "ema.pt")
    assert torch.equal(load_state_dict(tmp_path / "ema.pt")["w"], sd["w"])
    assert torch.equal(load_state_dict(tmp_path / "ema.pt", key="state_dict_ema")["w"],
                       sd["w"] * 0)

    def interrupted(tmp):
        Path(tmp).write_bytes(b"partial")
        raise KeyboardInterrupt
    from autobasin.io import atomic_write
    (tmp_path / "out.safetensors").write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "out.safetensors", interrupted)
    assert (tmp_path / "out.safetensors").read_bytes() == b"old"
    assert not list(tmp_path.glob(".*.tmp"))

    perms = {"g:out": torch.randperm(5)}
    for name in ("p.safetensors", "p.json"):
        save_perms(perms, tmp_path / name)
        assert torch.equal(load_perms(tmp_path / name)["g:out"], perms["g:out"])
    with pytest.raises(CheckpointReadError, match="garbage.bin"):
        (tmp_path / "garbage.bin").write_bytes(b"\x80garbage")
        load_state_dict(tmp_path / "garbage.bin")
    model = torch.nn.Linear(2, 3)
    with pytest.raises(CheckpointMismatchError,
                       match=r"f.pt does not fit Linear: 'bias' has shape \(4,\) in the "):
        load_into(model, {"weight": torch.zeros(3, 2), "bias": torch.zeros(4)}, source="f.pt")


def test_build_model_errors(tmp_path):
    assert isinstance(build_model("torchvision:resnet18", num_classes=3).fc, torch.nn.Linear)
    with pytest.raises(ModelSpecError, match="did you mean"):
        build_model("timm:vit_tiny_patch16_22")
    (tmp_path / "m.py").write_text("x = 1\ndef f():\n    return 3\n")
    with pytest.raises(ModelSpecError, match="returned a int"):
        build_model(f"{tmp_path / 'm.py'}:f")
    with pytest.raises(ModelSpecError, match="name the factory"):
        build_model(str(tmp_path / "m.py"))


# ------------------------------------------------------- audit of the issue
def test_help_documents_exit_codes(capsys):
    from importlib.metadata import entry_points
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("autobasin") == "autobasin.cli:main"     # the `autobasin` command
    for argv in (["--help"], ["align", "--help"]):
        code, out, _ = run(capsys, *argv)
        assert code == 0
        assert "exit codes:" in out
        for line in ("0    success", "2    usage or input error", "3    a checkpoint",
                     "4    verification failed", "130  interrupted"):
            assert line in out, (argv, line)


def test_quiet_silences_progress_and_seed_is_reproducible(files, tmp_path, capsys):
    common = ["align", files["mlp"], "--a", files["a"], "--b", files["b"], "--seed", 7]
    code, out_loud, err = run(capsys, *common, "--out", tmp_path / "loud.safetensors")
    assert code == 0, err
    assert "weight matching (" in err and "sweep" in err      # the tqdm bar, named by its start
    assert "loading" in err and "aligning B to A" in err      # progress messages
    code, out_quiet, err = run(capsys, *common, "--out", tmp_path / "quiet.safetensors", "-q")
    assert code == 0, err
    assert err == ""
    assert "verified" in out_quiet                            # results still on stdout
    assert out_loud.replace("loud", "quiet").splitlines()[-2:] == out_quiet.splitlines()[-2:]
    loud = load_perms(tmp_path / "loud.perms.safetensors")
    quiet = load_perms(tmp_path / "quiet.perms.safetensors")
    assert loud.keys() == quiet.keys()
    assert all(torch.equal(loud[k], quiet[k]) for k in loud)


def test_checks_run_before_the_long_part(files, tmp_path, capsys, monkeypatch):
    """Bad inputs are reported before matching or interpolation starts."""
    import autobasin.api
    import autobasin.barrier

    def never(*args, **kwargs):
        raise AssertionError("the long part started before the inputs were checked")
    monkeypatch.setattr(autobasin.api, "auto_rebasin", never)
    monkeypatch.setattr(autobasin.barrier, "loss_barrier", never)
    monkeypatch.setattr(autobasin, "merge_many", never)
    out = tmp_path / "o.safetensors"
    cases = [
        (["align", files["mlp"], "--a", files["narrow"], "--b", files["b"], "--out", out],
         3, "narrow.pt"),                                   # A is bad, B is good
        (["align", files["mlp"], "--a", files["a"], "--b", files["b"], "--out", out,
          "--method", "activation", "--data", tmp_path / "nowhere"], 2, "nowhere"),
        (["barrier", files["mlp"], "--a", files["a"], "--b", files["b"], "--data", "digits",
          "--plot", tmp_path], 2, "--plot"),
        (["barrier", "timm:test_resnet", "--a", files["ra"], "--b", files["rb"],
          "--data", "digits"], 2, "cannot run on a batch"),
        (["barrier", files["mlp"], "--a", files["a"], "--b", files["b"], "--data", "digits",
          "--input-size", 3, 8, 8], 2, "cannot run on --input-size 3 8 8 (shape (2, 3, 8, 8)) "
                                      "at layer 'fc1'"),
        (["merge", files["mlp"], files["a"], files["b"], "--out", out, "--input-size", 3, 8, 8],
         2, "at layer 'fc1'"),
    ]
    for argv, want, needle in cases:
        code, _, err = run(capsys, *argv, "-q")
        assert code == want and needle in err, (argv, err)
        assert "AssertionError" not in err and not out.exists()


INSPECT_SOURCE = '''
import torch
from torch import nn


class CheckedScale(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(channels) + 0.5)

    def forward(self, x):
        if not torch.isfinite(x).all():
            raise ValueError("non-finite input")
        return x * self.scale[:, None, None]


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(x)
        return h * 2 if h.sum() > 0 else h


def blocked():
    return nn.Sequential(nn.Conv2d(3, 8, 3), CheckedScale(8), nn.ReLU(), nn.Conv2d(8, 4, 3))


def untraceable():
    return Branchy()
'''


def test_inspect_shows_blocked_ops_and_why(tmp_path, capsys):
    (tmp_path / "odd.py").write_text(INSPECT_SOURCE)
    code, out, err = run(capsys, "inspect", f"{tmp_path / 'odd.py'}:blocked",
                         "--input-size", 3, 12, 12, "--plot", tmp_path / "odd.png")
    assert code == 0, err
    assert "blocked ops (2), where inference left axes unpermuted:" in out
    assert "no rule for module CheckedScale" in out
    assert "opaque module: TraceError" in out
    assert "0 groups over 5 parameters (5 fixed" in out
    assert "autobasin: warning: submodule '1' (CheckedScale) cannot be traced" in err
    assert (tmp_path / "odd.png").read_bytes()[:4] == b"\x89PNG"
    # the top-level forward itself cannot be traced: exit code 1, one line naming it
    code, _, err = run(capsys, "inspect", f"{tmp_path / 'odd.py'}:untraceable",
                       "--input-size", 4, "-q")
    assert code == 1
    assert "Traceback" not in err
    assert err.strip().startswith("autobasin: error: cannot capture Branchy: torch.fx cannot trace")
    assert "torch.export" in err and len(err.strip().splitlines()) == 1


def test_training_checkpoint_layouts_keep_dtype(files, tmp_path, capsys):
    """timm's train.py and torchvision's reference scripts pickle their argparse Namespace
    next to the weights; bf16 B stays bf16 in a .safetensors output."""
    import argparse
    b_sd = {k: v.bfloat16() for k, v in files["mlp1"].state_dict().items()}
    train_args = argparse.Namespace(model="mlp", lr=0.1, data_dir=Path("/data"), epochs=2)
    optimizer = torch.optim.SGD(files["mlp1"].parameters(), lr=0.1).state_dict()
    torch.save({"epoch": 2, "arch": "mlp", "version": 2, "metric": 0.5, "args": train_args,
                "optimizer": optimizer,
                "state_dict": {f"module.{k}": v for k, v in b_sd.items()},
                "state_dict_ema": {k: torch.zeros_like(v) for k, v in b_sd.items()}},
               tmp_path / "timm_b.pth.tar")
    torch.save({"model": files["mlp0"].state_dict(), "optimizer": optimizer, "epoch": 2,
                "lr_scheduler": {"last_epoch": 2}, "args": train_args}, tmp_path / "tv_a.pth")
    out = tmp_path / "b_aligned.safetensors"
    code, stdout, err = run(capsys, "align", files["mlp"], "--a", tmp_path / "tv_a.pth",
                            "--b", tmp_path / "timm_b.pth.tar", "--out", out, "-q")
    assert code == 0, err
    aligned = load_state_dict(out)
    assert aligned.keys() == b_sd.keys()
    for k, v in aligned.items():
        assert v.dtype == torch.bfloat16, k
        # a permutation of B's stored values, bit for bit
        assert torch.equal(v.flatten().sort().values, b_sd[k].flatten().sort().values), k
    assert not torch.equal(aligned["fc1.weight"], b_sd["fc1.weight"])
    code, _, err = run(capsys, "align", files["mlp"], "--a", tmp_path / "tv_a.pth",
                       "--b", tmp_path / "timm_b.pth.tar", "--out", out, "-q",
                       "--checkpoint-key", "nothing_here")
    assert code == 2 and "timm_b.pth.tar" in err and "'nothing_here'" in err


DATA_MODULE = '''
import torch
from torch.utils.data import DataLoader, TensorDataset


def images(split="heldout"):
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    data = TensorDataset(torch.randn(16, 3, 32, 32, generator=g) * 2 + 1,
                         torch.randint(0, 10, (16,), generator=g))
    return DataLoader(data, batch_size=8)
'''


def test_merge_reset_bn_with_module_function_data(files, tmp_path, capsys, monkeypatch):
    """merge on a BatchNorm net with ``module:function`` DATA: statistics are recomputed once,
    on that data (the same numbers reset_bn_stats gives the plain merge)."""
    from autobasin.repair import reset_bn_stats
    (tmp_path / "cli_test_images.py").write_text(DATA_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    common = ["merge", "timm:test_resnet", files["ra"], files["rb"], "--input-size", 3, 32, 32,
              "-q"]
    code, stdout, err = run(capsys, *common, "--out", tmp_path / "plain.safetensors")
    assert code == 0, err
    assert "merged 2 checkpoints" in stdout
    code, stdout, err = run(capsys, *common, "--out", tmp_path / "reset.safetensors",
                            "--data", "cli_test_images:images", "--reset-bn")
    assert code == 0, err
    assert "BatchNorm statistics reset" in stdout
    plain = load_into(build_model("timm:test_resnet"),
                      load_state_dict(tmp_path / "plain.safetensors"))
    reset = load_state_dict(tmp_path / "reset.safetensors")
    sys.modules.pop("cli_test_images", None)
    from cli_test_images import images  # noqa: E402 - the module the CLI imported
    expected = reset_bn_stats(plain, images(split="train")).state_dict()
    stats = [k for k in expected if k.endswith("running_var")]
    assert stats
    for k in stats:
        torch.testing.assert_close(reset[k], expected[k])
    assert not torch.allclose(reset[stats[0]],
                              load_state_dict(tmp_path / "plain.safetensors")[stats[0]])
    weights = [k for k in reset if k.endswith("weight")]
    assert weights and all(torch.equal(reset[k], plain.state_dict()[k]) for k in weights)


def test_barrier_on_mnist_idx_folder(tmp_path, capsys):
    """DATA as a folder of MNIST IDX files, end to end through the command line."""
    import gzip
    import struct
    from autobasin.data import MNIST_IMAGES, MNIST_LABELS
    n = 8_016
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (n, 28, 28), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=gen, dtype=torch.uint8)
    for name, values in ((MNIST_IMAGES, pixels), (MNIST_LABELS, labels)):
        header = struct.pack(">HBB", 0, 0x08, values.dim()) + struct.pack(
            f">{values.dim()}I", *values.shape)
        with gzip.open(tmp_path / name, "wb", compresslevel=1) as f:
            f.write(header + values.numpy().tobytes())
    (tmp_path / "mnist_mlp.py").write_text(
        "from autobasin.demo import make_mlp\n"
        "def mlp(seed=0):\n    return make_mlp(784, [32], 10, seed=seed)\n")
    factory = f"{tmp_path / 'mnist_mlp.py'}:mlp"
    for seed in (0, 1):
        save_state_dict(build_model(factory, seed=seed).state_dict(),
                        tmp_path / f"m{seed}.safetensors")
    code, stdout, err = run(capsys, "barrier", factory, "--a", tmp_path / "m0.safetensors",
                            "--b", tmp_path / "m1.safetensors", "--data", tmp_path,
                            "--lambdas", 3, "--json", tmp_path / "curve.json", "-q")
    assert code == 0, err
    assert f"MNIST IDX {tmp_path}, heldout split (16 images)" in stdout
    # align matches on the training split, and says so (it used to name the held-out split)
    code, _, err = run(capsys, "align", factory, "--a", tmp_path / "m0.safetensors",
                       "--b", tmp_path / "m1.safetensors", "--data", tmp_path, "--method",
                       "activation", "--out", tmp_path / "aligned.safetensors")
    assert code == 0, err
    assert f"matching data: MNIST IDX {tmp_path}, train split (" in err
    assert "heldout" not in err
    doc = json.loads((tmp_path / "curve.json").read_text())
    assert len(doc["naive"]["losses"]) == 3 and doc["naive"]["accuracies"] is not None


def test_results_piped_into_a_reader_that_stops_still_write_the_files(tmp_path):
    """``autobasin inspect ... | head -1``: stdout closes early; the command
    still exits 0 and writes what it was asked to."""
    import subprocess
    import sys
    out = tmp_path / "spec.json"
    proc = subprocess.Popen([sys.executable, "-m", "autobasin.cli", "inspect", "timm:resnet10t",
                             "--json", str(out), "-q"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=tmp_path)
    proc.stdout.close()  # the reader stops before the first line
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-500:]
    assert out.exists() and b"BrokenPipe" not in err


def test_align_with_scaled_permutations(files, tmp_path, capsys):
    """--symmetries scale: the ReLU units are aligned by permutations times positive
    scalings; the file computes what B computes, and lands closer to A."""
    def align(*extra):
        out = tmp_path / f"aligned{len(extra)}.safetensors"
        perms = tmp_path / f"perms{len(extra)}.safetensors"
        code, stdout, err = run(capsys, "align", files["mlp"], "--a", files["b"], "--b",
                                files["a"], "--out", out, "--perms", perms, "-q", *extra)
        assert code == 0, err
        line = next(l for l in stdout.splitlines() if l.startswith("L2 distance"))
        return out, perms, float(line.split()[-1])
    _, _, d_perm = align()
    out, perms, d_scale = align("--symmetries", "scale")
    assert d_scale < d_perm
    elements = load_perms(perms)
    assert elements["fc1:out"].dtype == torch.float64 and elements["fc1:out"].shape == (32, 32)
    b = load_into(build_model(files["mlp"]), load_state_dict(files["a"]))
    aligned = load_into(build_model(files["mlp"]), load_state_dict(out))
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(outputs(aligned, x), outputs(b, x), atol=1e-5, rtol=1e-5)
    code, _, err = run(capsys, "align", files["mlp"], "--a", files["b"], "--b", files["a"],
                       "--out", tmp_path / "x.safetensors", "--symmetries", "affine")
    assert code != 0 and "affine" in err
