"""Helpers for testing specs on real architectures (used by tests and benchmarks)."""
from __future__ import annotations

import torch
from torch import nn

# The test zoo: every timm ``test_*`` model plus these (timm names unless
# prefixed ``torchvision:``).
TEST_ZOO_EXTRA = [
    "resnet18", "vit_tiny_patch16_224", "convnext_atto", "efficientnet_b0",
    "mobilenetv3_small_050", "regnety_002", "densenet121", "ghostnet_050", "mixer_s16_224",
    "levit_128s", "swin_tiny_patch4_window7_224", "poolformerv2_s12",
    "torchvision:resnet18", "torchvision:vgg11_bn", "torchvision:mobilenet_v3_small",
    "torchvision:shufflenet_v2_x0_5", "torchvision:vit_b_16",
    # found by the zoo sweep: a wrapped function with shape-dependent control flow
    # (swin v2's shifted_window_attention), a fused qkv both sliced and reshaped into
    # heads (coat, swin v2), a zero k_bias buffer outside the state_dict (dinov3)
    "torchvision:swin_v2_t", "coat_tiny", "vit_tiny_patch16_dinov3_qkvb",
]


def test_zoo() -> list[str]:
    """Names of the test zoo (timm ``test_*`` models first)."""
    import timm
    return sorted(timm.list_models("test_*")) + TEST_ZOO_EXTRA


test_zoo.__test__ = False  # a helper, not a pytest test


def create(name: str, **kwargs) -> nn.Module:
    """A randomly initialised model by zoo name, in eval mode."""
    if name.startswith("torchvision:"):
        import torchvision
        model = torchvision.models.get_model(name.split(":", 1)[1], weights=None, **kwargs)
    else:
        import timm
        model = timm.create_model(name.removeprefix("timm:"), pretrained=False, **kwargs)
    return model.eval()


@torch.no_grad()
def randomize_state_(model: nn.Module, seed: int = 0, scale: float = 0.02) -> nn.Module:
    """Make every floating parameter and buffer non-trivial, in place.

    Zero or constant initialisations (zero-init residual BatchNorm scales,
    layer-scale 1e-5, running statistics of 0 and 1) can hide a wrong
    permutation from an output comparison; this perturbs weights by
    ``scale * N(0, 1)`` and draws running means around 0 and variances in
    [0.5, 1.5].
    """
    gen = torch.Generator().manual_seed(seed)
    for name, t in model.state_dict().items():
        if not t.is_floating_point():
            continue
        noise = torch.randn(t.shape, generator=gen)
        if name.endswith("running_var"):
            t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
        elif name.endswith("running_mean"):
            t.copy_(noise * 0.1)
        else:
            t.add_(noise.to(t.dtype) * scale)
    return model
