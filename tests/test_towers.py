import pytest
import torch

from bench.core.errors import UserError
from bench.experiment.config import compose_config
from bench.modeling.towers import ConvStem, VisionTower


@pytest.mark.parametrize("patch_size", [8, 12, 14, 16])
def test_the_conv_stem_keeps_one_token_per_patch(patch_size):
    stem = ConvStem(3, 64, patch_size)
    size = 7 * patch_size
    assert stem(torch.zeros(2, 3, size, size)).shape == (2, 64, 7, 7)


def test_a_tower_with_the_conv_stem_sees_the_same_tokens_through_keep():
    torch.manual_seed(0)
    tower = VisionTower(compose_config("clip").model.image).eval()
    assert isinstance(tower.vit.conv1, ConvStem) and tower.patch_size == 12 and tower.num_patches == 64
    images = torch.randn(2, 1, 96, 96)
    with torch.no_grad():
        pooled, tokens = tower(images)
        keep = torch.arange(64).repeat(2, 1)
        _, kept_tokens = tower(images, keep=keep)
        _, some = tower(images, keep=keep[:, [5, 40]])
    assert tokens.shape == (2, 64, tower.width)
    torch.testing.assert_close(kept_tokens, tokens)
    assert not torch.allclose(some, tokens[:, [5, 40]])  # the transformer saw only the two kept patches


def test_a_stem_other_than_patch_or_conv_is_refused():
    with pytest.raises(UserError, match="model.image.stem"):
        compose_config("clip", overrides=["model.image.stem=resnet"])
