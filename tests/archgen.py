"""Random architectures for property tests, built from a list of pieces.

``ConvNet`` stacks channel-first pieces (residual, concat, split, grouped
and depthwise conv, BatchNorm/GroupNorm/LayerNorm2d, squeeze-excite gates,
free per-channel parameters, a submodule with data-dependent control flow,
in-place ops, one conv applied twice); ``TokenNet`` stacks token pieces
(attention with fused qkv or nn.MultiheadAttention, MLP, RMSNorm/LayerNorm,
layer scale, gating, a custom autograd.Function, in-place ops).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

CONV_PIECES = ["conv", "residual", "concat", "split", "grouped", "depthwise", "se", "scale", "gn",
               "ln2d", "bn_act", "branch", "inplace", "shared"]
TOKEN_PIECES = ["attn", "attn_sdpa", "mlp", "glu", "scale", "rms", "chunk", "mha", "fn", "inplace"]


class DataDependent(nn.Module):
    """A conv whose sign depends on the data: fx cannot trace it, so it is an opaque leaf."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x):
        y = self.conv(x)
        if x.mean() > 0:
            return y
        return -y


class Swish(torch.autograd.Function):
    """A custom autograd.Function (elementwise)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return grad * (s + x * s * (1 - s))


def _norm(kind: str, c: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(c)
    if kind == "gn":
        g = next(g for g in (4, 2, 1) if c % g == 0)
        return nn.GroupNorm(g, c)
    from timm.layers import LayerNorm2d
    return LayerNorm2d(c)


class ConvPiece(nn.Module):
    def __init__(self, kind: str, c: int, width: int, norm: str):
        super().__init__()
        self.kind = kind
        if kind == "conv":
            self.a, self.n = nn.Conv2d(c, width, 3, padding=1), _norm(norm, width)
            self.out_c = width
        elif kind == "residual":
            self.a, self.n, self.b = nn.Conv2d(c, width, 1), _norm(norm, width), nn.Conv2d(width, c, 3, padding=1)
            self.out_c = c
        elif kind == "concat":
            self.a = nn.Conv2d(c, width, 1)
            self.out_c = c + width
        elif kind == "split":
            self.a = nn.Conv2d(c, 2 * width, 1)
            self.b = nn.Conv2d(width, width, 1)
            self.out_c = width
        elif kind == "grouped":
            g = 2 if c % 2 == 0 else 1
            self.a = nn.Conv2d(c, 2 * g * max(1, width // (2 * g)), 3, padding=1, groups=g)
            self.out_c = self.a.out_channels
        elif kind == "depthwise":
            self.a = nn.Conv2d(c, 2 * c, 3, padding=1, groups=c)
            self.out_c = 2 * c
        elif kind == "se":
            self.a, self.b = nn.Conv2d(c, max(1, c // 2), 1), nn.Conv2d(max(1, c // 2), c, 1)
            self.out_c = c
        elif kind == "scale":
            self.gamma = nn.Parameter(torch.randn(c, 1, 1))
            self.beta = nn.Parameter(torch.randn(1, c, 1, 1))
            self.out_c = c
        elif kind in ("gn", "ln2d"):
            self.n = _norm(kind if kind == "gn" else "ln", c)
            self.out_c = c
        elif kind == "bn_act":
            from timm.layers import BatchNormAct2d
            self.n = BatchNormAct2d(c)
            self.out_c = c
        elif kind == "branch":
            self.a, self.gate, self.b = nn.Conv2d(c, width, 1), DataDependent(width), nn.Conv2d(width, c, 1)
            self.out_c = c
        elif kind == "inplace":
            self.a, self.b = nn.Conv2d(c, width, 3, padding=1), nn.Conv2d(width, c, 1)
            self.out_c = c
        elif kind == "shared":
            self.a = nn.Conv2d(c, c, 3, padding=1)
            self.out_c = c

    def forward(self, x):
        k = self.kind
        if k == "conv":
            return F.relu(self.n(self.a(x)))
        if k == "residual":
            return x + self.b(F.gelu(self.n(self.a(x))))
        if k == "concat":
            return torch.cat([x, torch.tanh(self.a(x))], dim=1)
        if k == "split":
            p, q = self.a(x).chunk(2, dim=1)
            return self.b(F.relu(p)) * torch.sigmoid(q)
        if k in ("grouped", "depthwise"):
            return F.silu(self.a(x))
        if k == "se":
            s = x.mean((2, 3), keepdim=True)
            return x * torch.sigmoid(self.b(F.relu(self.a(s))))
        if k == "scale":
            return x * self.gamma + self.beta
        if k == "branch":
            return x + self.b(self.gate(F.relu(self.a(x))))
        if k == "inplace":
            h = self.a(x)
            h.relu_()
            out = self.b(h)
            out += x
            return out.mul_(0.5)
        if k == "shared":
            return self.a(F.relu(self.a(x)))
        return self.n(x)


class ConvNet(nn.Module):
    def __init__(self, pieces: list[tuple[str, int, str]], in_c: int = 3, stem: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(in_c, stem, 3, padding=1)
        c, blocks = stem, []
        for kind, width, norm in pieces:
            blocks.append(ConvPiece(kind, c, width, norm))
            c = blocks[-1].out_c
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class TokenPiece(nn.Module):
    def __init__(self, kind: str, d: int, heads: int):
        super().__init__()
        self.kind, self.heads = kind, heads
        if kind in ("attn", "attn_sdpa"):
            self.norm = nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        elif kind == "mlp":
            self.norm, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        elif kind == "glu":
            self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(2 * d, d)
        elif kind == "scale":
            self.gamma = nn.Parameter(torch.randn(d))
        elif kind == "rms":
            self.norm = nn.RMSNorm(d)
        elif kind == "chunk":
            self.fc = nn.Linear(d, 2 * d)
        elif kind == "mha":
            self.mha = nn.MultiheadAttention(d, heads, batch_first=True)
        elif kind in ("fn", "inplace"):
            self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        k = self.kind
        if k in ("attn", "attn_sdpa"):
            b, n, d = x.shape
            h = self.heads
            q, kk, v = self.qkv(self.norm(x)).reshape(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4).unbind(0)
            if k == "attn_sdpa":
                a = F.scaled_dot_product_attention(q, kk, v)
            else:
                a = (q @ kk.transpose(-2, -1) * 0.3).softmax(-1) @ v
            return x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        if k == "mlp":
            return x + self.fc2(F.gelu(self.fc1(self.norm(x))))
        if k == "glu":
            a, g = self.fc1(x).chunk(2, dim=-1)
            return x + self.fc2(a * F.silu(g))
        if k == "scale":
            return x * self.gamma
        if k == "rms":
            return self.norm(x)
        if k == "mha":
            return x + self.mha(x, x, x, need_weights=False)[0]
        if k == "fn":
            return x + self.fc2(Swish.apply(self.fc1(x)))
        if k == "inplace":
            h = self.fc1(x)
            h.tanh_()
            out = self.fc2(h)
            out.add_(x)
            return out
        p, q = self.fc(x).chunk(2, dim=-1)
        return p + torch.tanh(q)


class TokenNet(nn.Module):
    def __init__(self, pieces: list[str], d: int = 16, heads: int = 4, n_in: int = 5):
        super().__init__()
        self.embed = nn.Linear(n_in, d)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, 7, d) * 0.1)
        self.blocks = nn.Sequential(*[TokenPiece(k, d, heads) for k in pieces])
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        x = self.embed(x)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.blocks(x)[:, 0])


conv_pieces = st.lists(st.tuples(st.sampled_from(CONV_PIECES), st.sampled_from([4, 6, 8]),
                                 st.sampled_from(["bn", "gn", "ln"])), min_size=1, max_size=5)
token_pieces = st.lists(st.sampled_from(TOKEN_PIECES), min_size=1, max_size=5)
