"""``masked_scatter`` into the token embeddings, twice (LLaVA-NeXT-Video: the
images' features, then the videos' features flattened and concatenated into
one flat tensor): the hidden axis stays free through both, and a flat source
that is not whole rows of the stream's width fixes it."""
import pytest
import torch
from torch import nn

from autobasin import check_equivalence
from autobasin.infer import infer_spec
from autobasin.testing import randomize_state_

IMAGE, VIDEO = 3, 4


class ImagesThenVideos(nn.Module):
    def __init__(self, flat_extra: int = 0):
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.image, self.video = nn.Linear(6, 16), nn.Linear(5, 16)
        self.mlp, self.head = nn.Linear(16, 16), nn.Linear(16, 20)
        self.flat_extra = flat_extra

    def forward(self, ids, image, video):
        h = self.embed(ids)
        h = h.masked_scatter((ids == IMAGE).unsqueeze(-1), self.image(image))
        feats = self.video(video).reshape(-1)  # (samples, tokens, 16) as one flat source
        if self.flat_extra:
            feats = torch.cat([feats, feats[:self.flat_extra]])
        h = h.masked_scatter((ids == VIDEO).unsqueeze(-1), feats)
        h = h + torch.relu(self.mlp(h))
        return self.head(h)


def _args():
    ids = torch.tensor([[1, 3, 3, 4, 4, 5], [3, 4, 2, 3, 4, 6]])
    return ids, torch.randn(4, 6), torch.randn(2, 2, 5)


def _on(spec, param, axis):
    return any(m.param == param and m.axis == axis for g in spec.groups.values() for m in g.members)


@pytest.mark.parametrize("capture", ["export", "fx"])
def test_two_masked_scatters_keep_the_stream_free(capture):
    torch.manual_seed(0)
    model = randomize_state_(ImagesThenVideos().eval())
    args = _args()
    spec = infer_spec(model, args, capture=capture)
    assert _on(spec, "embed.weight", 1), str(spec)
    assert _on(spec, "video.weight", 0) and _on(spec, "image.weight", 0), str(spec)
    assert not any("masked_scatter" in r for _, r in spec.fixed_axes()), spec.fixed_axes()
    for seed in range(4):
        assert check_equivalence(model, spec, args, seed=seed) <= 1e-5


def test_flat_source_not_whole_rows_fixes_the_stream():
    torch.manual_seed(0)
    model = randomize_state_(ImagesThenVideos(flat_extra=5).eval())
    args = _args()
    spec = infer_spec(model, args, capture="export")
    assert not _on(spec, "embed.weight", 1), str(spec)
    assert any("masked_scatter" in r for _, r in spec.fixed_axes())
    for seed in range(3):
        assert check_equivalence(model, spec, args, seed=seed) <= 1e-5
