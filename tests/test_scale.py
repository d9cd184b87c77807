"""Scale: the assignment solvers, similarities updated between sweeps, and
checkpoints aligned without holding either model (memory-mapped in, streamed out)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from autobasin import auto_rebasin, infer_spec, random_permutation, weight_matching
from autobasin.files import align_files
from autobasin.io import CheckpointMismatchError, load_state_dict, save_safetensors_streaming
from autobasin.match import lap
from autobasin.permute import EquivalenceError, apply_permutation, permute_model
from autobasin.testing import create as _create, randomize_state_


def create(arch: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return _create(arch).eval()


@pytest.fixture
def solver():
    yield lap.set_solver
    lap.set_solver(None)


# ----------------------------------------------------------------- solvers
@pytest.mark.parametrize("name", lap.available_solvers())
def test_every_solver_finds_the_optimum(solver, name):
    solver(name)
    gen = torch.Generator().manual_seed(0)
    from scipy.optimize import linear_sum_assignment
    for n, dtype in ((1, torch.float32), (7, torch.float64), (60, torch.float32), (200, torch.float64)):
        s = torch.randn(n, n, generator=gen, dtype=dtype)
        if n == 60:
            s = s.round()  # ties
        before = s.clone()
        p = lap.solve_lap(s)
        assert torch.equal(s, before)  # negated in place and back: exactly as it was
        _, ref = linear_sum_assignment(s.double().numpy(), maximize=True)
        rows = torch.arange(n)
        assert sorted(p.tolist()) == list(range(n))
        assert float(s.double()[rows, p].sum()) == pytest.approx(
            float(s.double()[rows, torch.from_numpy(ref)].sum()), rel=1e-6, abs=1e-6)


def test_solver_choice_is_checked(solver, monkeypatch):
    with pytest.raises(ValueError, match="unknown assignment solver"):
        solver("hungarian")
    monkeypatch.setenv("AUTOBASIN_LAP", "scipy")
    assert lap.current_solver() == "scipy"
    monkeypatch.setenv("AUTOBASIN_LAP", "nope")
    with pytest.raises(ValueError, match="nope"):
        lap.current_solver()


def test_an_older_lap_module_is_not_taken_for_lapx(solver, monkeypatch):
    """gatagat's ``lap`` (no ``lapjvr``) installs the module lapx installs: not lapx."""
    import importlib.machinery
    import sys
    import types
    old = types.ModuleType("lap")
    old.__spec__ = importlib.machinery.ModuleSpec("lap", None)
    monkeypatch.setitem(sys.modules, "lap", old)
    assert not lap.installed("lapx") and "lapx" not in lap.available_solvers()
    with pytest.raises(ValueError, match="lapx"):
        solver("lapx")


@pytest.mark.parametrize("arch", ["test_resnet", "test_vit"])
def test_solvers_and_kept_similarities_give_the_same_matching(solver, arch):
    """Similarities kept and updated by the columns that moved equal recomputed ones:
    the same permutations for every cache budget and both solvers (timm test models:
    residual streams, heads x head-dim grids, fused qkv segments)."""
    a, b = create(arch, seed=0), create(arch, seed=1)
    spec = infer_spec(a, torch.randn(1, 3, 64, 64) if arch == "test_resnet" else torch.randn(1, 3, 160, 160))
    sd_a, sd_b = a.state_dict(), b.state_dict()
    runs = {}
    for name in lap.available_solvers():
        solver(name)
        for budget in (0.0, 0.25, 10.0):
            r = weight_matching(spec, sd_a, sd_b, progress=False, init="identity", cache_budget=budget)
            runs[name, budget] = r
    ref = runs["scipy", 0.0]
    assert ref.sweeps >= 2  # descent had updates to make
    for key, r in runs.items():
        assert r.objective == pytest.approx(ref.objective, rel=1e-6), key
        assert all(torch.equal(r[g], ref[g]) for g in spec.groups), key


@pytest.mark.parametrize("arch", ["test_resnet", "test_vit"])
@pytest.mark.parametrize("init", ["greedy", "identity"])
def test_slicing_and_reused_buffers_leave_the_matching_unchanged(arch, init, monkeypatch):
    """Products and objectives taken a slice at a time through the workspace's reused
    buffers (down to one position per slice, slots regrown) give the permutations and
    objective of whole tensors, and the objective is <A, P(B)> computed directly."""
    from autobasin.match import weight
    a, b = create(arch, seed=0), create(arch, seed=1)
    spec = infer_spec(a, torch.randn(1, 3, 64, 64) if arch == "test_resnet" else torch.randn(1, 3, 160, 160))
    sd_a, sd_b = a.state_dict(), b.state_dict()
    runs = {}
    for chunk in (1, 7, 1 << 30):
        monkeypatch.setattr(weight, "_CHUNK", chunk)
        runs[chunk] = weight_matching(spec, sd_a, sd_b, progress=False, init=init)
    ref = runs[1 << 30]
    assert ref.sweeps >= 2 or init == "greedy"  # identity: descent had updates to make
    for chunk, r in runs.items():
        assert r.objective == pytest.approx(ref.objective, rel=1e-6), chunk
        assert all(torch.equal(r[g], ref[g]) for g in spec.groups), chunk
    aligned = apply_permutation(spec, ref, sd_b)
    params = {k for k, info in spec.tensors.items() if info.is_parameter} if spec.tensors else set(sd_a)
    direct = sum(float((sd_a[k].double() * aligned[k].double()).sum())
                 for k in spec.members_by_param() if k in params)
    assert ref.objective == pytest.approx(direct, rel=1e-5)


def test_planted_recovery_with_every_solver(solver):
    a = create("test_vit", seed=0)
    spec = infer_spec(a, torch.randn(1, 3, 160, 160))
    planted = random_permutation(spec, seed=3)
    b = permute_model(a, spec, planted)
    for name in lap.available_solvers():
        solver(name)
        r = weight_matching(spec, a.state_dict(), b.state_dict(), progress=False)
        aligned = apply_permutation(spec, r, b.state_dict())
        assert all(torch.equal(aligned[k], v) for k, v in a.state_dict().items()), name


# --------------------------------------------------------------- files
def test_streaming_writer_round_trips_every_dtype(tmp_path):
    gen = torch.Generator().manual_seed(0)
    sd = {"f32": torch.randn(3, 4, generator=gen), "f64": torch.randn(5, dtype=torch.float64),
          "bf16": torch.randn(2, 3).bfloat16(), "f16": torch.randn(4).half(),
          "i64": torch.arange(6).reshape(2, 3), "b": torch.tensor([True, False]),
          "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3), "u8": torch.arange(4, dtype=torch.uint8)}
    path = save_safetensors_streaming(sd, lambda k: sd[k].clone(), tmp_path / "x.safetensors",
                                      metadata={"note": "hi"})
    back = load_file(str(path))
    assert set(back) == set(sd) and all(torch.equal(back[k], v) and back[k].dtype == v.dtype
                                        for k, v in sd.items())
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["note"] == "hi"
    with pytest.raises(ValueError, match="'f32'"):
        save_safetensors_streaming(sd, lambda k: sd[k].double(), tmp_path / "y.safetensors")
    assert not (tmp_path / "y.safetensors").exists()  # atomic: nothing half-written


def _checkpoints(tmp_path, arch="test_resnet"):
    a, b = create(arch, seed=0), create(arch, seed=1)
    for m in (a, b):
        randomize_state_(m, seed=5)  # BatchNorm statistics that differ per channel
    save_file({k: v.contiguous() for k, v in a.state_dict().items()}, str(tmp_path / "a.safetensors"))
    torch.save(b.state_dict(), tmp_path / "b.pt")  # a zip checkpoint: memory-mapped too
    return a, b


def test_align_files_writes_what_auto_rebasin_computes(tmp_path):
    a, b = _checkpoints(tmp_path)
    x = torch.randn(2, 3, 64, 64)
    model = create("test_resnet", seed=7)
    r = align_files(model, tmp_path / "a.safetensors", tmp_path / "b.pt", tmp_path / "out.safetensors",
                    x, perms_out=tmp_path / "p.json", progress=False)
    assert r.verify_error is not None and r.verify_error < 1e-5
    ref = auto_rebasin(a, b, x, progress=False)
    out = load_file(str(tmp_path / "out.safetensors"))
    assert set(out) == set(ref.state_dict)
    assert all(torch.equal(out[k], ref.state_dict[k]) for k in out)
    assert r.perms_path.exists()
    # the model ends holding the aligned tensors, which compute what B computes
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), b.eval()(x), atol=1e-5, rtol=1e-4)


def test_align_files_refuses_a_wrong_spec_and_leaves_no_file(tmp_path):
    _checkpoints(tmp_path)
    x = torch.randn(2, 3, 64, 64)
    model = create("test_resnet", seed=7)
    spec = infer_spec(model, x)
    g = max(spec.groups.values(), key=lambda g: g.size)
    g.members = g.members[:1]  # a group missing its readers: permuting it changes the function
    with pytest.raises(EquivalenceError, match="out.safetensors was removed"):
        align_files(model, tmp_path / "a.safetensors", tmp_path / "b.pt",
                    tmp_path / "out.safetensors", x, spec=spec, progress=False)
    assert not (tmp_path / "out.safetensors").exists()


def test_align_files_names_a_checkpoint_that_does_not_fit(tmp_path):
    _checkpoints(tmp_path)
    with pytest.raises(CheckpointMismatchError, match="a.safetensors"):
        align_files(nn.Linear(3, 4), tmp_path / "a.safetensors", tmp_path / "b.pt",
                    tmp_path / "out.safetensors", torch.randn(1, 3), progress=False)


_ANON_PROBE = """
import sys, torch
from autobasin.io import load_state_dict
def anon():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon"))
before = anon()
t = load_state_dict(sys.argv[1])["w"]
# summed without a float64 copy of t: the only memory the reading may take
print(float(t.sum(dtype=torch.float64)), anon() - before)
"""


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="Linux /proc")
def test_checkpoints_load_memory_mapped(tmp_path):
    """Reading every value of a loaded 48 MB checkpoint takes no anonymous memory:
    the tensors are the file's pages (which the OS may drop), not a copy read in.
    Measured in a fresh interpreter: what earlier tests left in this process's heap
    (freed, trimmed or not) moves its resident set by more than the margin."""
    import subprocess
    import sys
    sd = {"w": torch.randn(3, 1024, 4096, generator=torch.Generator().manual_seed(0))}
    torch.save(sd, tmp_path / "w.pt")
    save_file(sd, str(tmp_path / "w.safetensors"))
    expected = float(sd["w"].double().sum())
    del sd
    for name in ("w.pt", "w.safetensors"):
        out = subprocess.run([sys.executable, "-c", _ANON_PROBE, str(tmp_path / name)],
                             capture_output=True, text=True, check=True).stdout.split()
        assert float(out[0]) == pytest.approx(expected), name
        assert int(out[1]) < 16 * 2**20, name


def test_merge_files_averages_the_aligned_checkpoints(tmp_path):
    """merge_files = the first checkpoint and every other aligned to it (what align_files
    writes), averaged; each alignment verified; no temporary file left behind."""
    from autobasin.files import merge_files
    a, b = _checkpoints(tmp_path)
    c = create("test_resnet", seed=2)
    save_file({k: v.contiguous() for k, v in c.state_dict().items()}, str(tmp_path / "c.safetensors"))
    x = torch.randn(2, 3, 64, 64)
    paths = [tmp_path / "a.safetensors", tmp_path / "b.pt", tmp_path / "c.safetensors"]
    r = merge_files(create("test_resnet", seed=7), paths, tmp_path / "m" / "merged.safetensors", x,
                    progress=False)
    assert len(r.perms) == 2 and len(r.verify_errors) == 2 and max(r.verify_errors) < 1e-5
    merged = load_file(str(r.path))
    sd_a = a.state_dict()
    aligned = [apply_permutation(r.spec, p, m.state_dict()) for p, m in zip(r.perms, (b, c))]
    for k, v in sd_a.items():
        if v.is_floating_point():
            want = (v + aligned[0][k] + aligned[1][k]) / 3
            torch.testing.assert_close(merged[k], want, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(merged[k], v), k
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["merged.safetensors"]
    # the same permutations as aligning each by itself
    for p, path in zip(r.perms, paths[1:]):
        one = align_files(create("test_resnet", seed=7), paths[0], path, tmp_path / "one.safetensors",
                          x, progress=False)
        assert all(torch.equal(p[g], one.perms[g]) for g in p)


def test_align_files_keeps_half_precision_and_verifies_in_float32(tmp_path):
    """bf16 checkpoints: the spec is inferred on bf16 inputs, the file keeps bf16, and the
    check runs on a float32 copy (bf16 rounding of a reordered sum would exceed 1e-4)."""
    a, b = create("test_resnet", seed=0), create("test_resnet", seed=1)
    for name, m in (("a", a), ("b", b)):
        save_file({k: (v.bfloat16() if v.is_floating_point() else v).contiguous()
                   for k, v in m.state_dict().items()}, str(tmp_path / f"{name}.safetensors"))
    r = align_files(create("test_resnet", seed=7), tmp_path / "a.safetensors", tmp_path / "b.safetensors",
                    tmp_path / "out.safetensors", torch.randn(2, 3, 64, 64), progress=False)
    assert r.verify_error is not None and r.verify_error < 1e-5
    out, sd_b = load_file(str(tmp_path / "out.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    want = apply_permutation(r.spec, r.perms, sd_b)
    assert all(out[k].dtype == sd_b[k].dtype and torch.equal(out[k], want[k]) for k in sd_b)


def test_align_files_without_example_inputs_says_it_did_not_verify(tmp_path):
    _checkpoints(tmp_path)
    model = create("test_resnet", seed=7)
    spec = infer_spec(model, torch.randn(2, 3, 64, 64))
    with pytest.warns(UserWarning, match="not verified"):
        r = align_files(model, tmp_path / "a.safetensors", tmp_path / "b.pt",
                        tmp_path / "out.safetensors", spec=spec, progress=False)
    assert r.verify_error is None and r.path.exists()
