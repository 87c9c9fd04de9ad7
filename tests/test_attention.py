import pytest
import torch
from diffusers import UNet2DModel

from stepdistill.attention import configure_attention


def _unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=8).eval()


def test_cpu_falls_back_to_sdpa_with_a_warning_and_same_outputs():
    unet = _unet()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 500])
    before = unet(x, t).sample
    assert configure_attention(unet, "auto") == "sdpa"
    with pytest.warns(UserWarning, match="xformers requested but it cannot run here"):
        assert configure_attention(unet, "xformers") == "sdpa"
    assert torch.allclose(unet(x, t).sample, before, atol=1e-5)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        configure_attention(_unet(), "flash")
