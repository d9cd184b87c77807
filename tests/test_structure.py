"""Hand-checked group structure of well-known architectures."""
import pytest
import torch
from torch import nn

from autobasin.infer import infer_spec
from autobasin.testing import create


def mlp():
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 3))


def sizes(spec):
    return sorted(g.size for g in spec.groups.values())


def test_mlp_groups_are_the_hidden_layers():
    spec = infer_spec(mlp(), torch.randn(2, 10))
    assert set(spec.groups) == {"0:out", "2:out"}
    g0 = spec.groups["0:out"]
    assert g0.size == 32
    assert {(m.param, m.axis) for m in g0.members} == {("0.weight", 0), ("0.bias", 0), ("2.weight", 1)}
    assert {(m.param, m.axis) for m in spec.groups["2:out"].members} == {
        ("2.weight", 0), ("2.bias", 0), ("4.weight", 1)}
    # input features and logits are never permuted
    assert not any(m.param == "0.weight" and m.axis == 1 for g in spec.groups.values() for m in g.members)


def test_resnet18_one_group_per_stage_and_per_block():
    spec = infer_spec(create("resnet18"))
    names = set(spec.groups)
    # residual streams: one per stage (stem + stage 1 share the first)
    residual = [n for n in names if any((m.param == "conv1.weight" or m.param.endswith("downsample.0.weight"))
                                        and m.axis == 0 for m in spec.groups[n].members)]
    assert len(residual) == 4
    stage_sizes = sorted(spec.groups[n].size for n in residual)
    assert stage_sizes == [64, 128, 256, 512]
    inner = [n for n in names if n.endswith("conv1:out") and n.startswith("layer")]
    assert len(inner) == 8  # one per BasicBlock
    assert len(spec.groups) == 12
    g = spec.groups["layer1.0.conv1:out"]
    params = {(m.param, m.axis) for m in g.members}
    assert params == {("layer1.0.conv1.weight", 0), ("layer1.0.bn1.weight", 0), ("layer1.0.bn1.bias", 0),
                      ("layer1.0.bn1.running_mean", 0), ("layer1.0.bn1.running_var", 0),
                      ("layer1.0.conv2.weight", 1)}
    assert spec.coverage() == pytest.approx(1.0, abs=1e-3)


def test_vit_residual_heads_and_head_dims():
    model = create("vit_tiny_patch16_224")
    spec = infer_spec(model)
    depth, heads, dim = len(model.blocks), model.blocks[0].attn.num_heads, model.embed_dim
    head_dim = dim // heads
    residual = [g for g in spec.groups.values() if any(m.param == "cls_token" for m in g.members)]
    assert len(residual) == 1 and residual[0].size == dim
    assert any(m.param == "pos_embed" and m.axis == 2 for m in residual[0].members)
    for i in range(depth):
        block = [g for g in spec.groups.values() if g.members[0].param.startswith(f"blocks.{i}.")]
        got = sorted((g.size, len(g.members[0].shape)) for g in block)
        # heads, q/k head-dim, v/proj head-dim (all on the qkv grid), MLP hidden
        assert got == sorted([(heads, 2), (head_dim, 2), (head_dim, 2), (4 * dim, 1)])
        qk = [g for g in block if g.size == head_dim and any(m.param.endswith("proj.weight") for m in g.members)]
        assert len(qk) == 1, "v's head-dim is shared with the output projection only"
        vh = qk[0]
        assert all(m.offset in (2 * dim, 0) for m in vh.members)
    assert spec.coverage() == pytest.approx(1.0, abs=1e-3)


def test_convnext_atto_structure():
    model = create("convnext_atto")
    spec = infer_spec(model)
    n_blocks = sum(len(s.blocks) for s in model.stages)
    hidden = [g for g in spec.groups.values() if g.members[0].param.endswith("mlp.fc1.weight")]
    assert len(hidden) == n_blocks
    residual = [g for g in spec.groups.values() if g not in hidden]
    assert sorted(g.size for g in residual) == [40, 80, 160, 320]
    # depthwise conv, its norm and layer scale join the stage's residual group
    g = next(g for g in residual if g.size == 40)
    params = {m.param for m in g.members}
    assert {"stages.0.blocks.0.conv_dw.weight", "stages.0.blocks.0.norm.weight",
            "stages.0.blocks.0.gamma"} <= params
