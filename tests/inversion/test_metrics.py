import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from encoders.core.errors import RFIError
from encoders.data.embedded import EmbeddedCrops
from inversion.metrics import MAX_PSNR, lpips_distance, psnr, ssim
from inversion.perceptual import load_lpips

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/inversion/conftest.py


def _pair(size=48, n=3, noise=0.08):
    ds = EmbeddedCrops("val", size, n, seed=1)
    x = torch.stack([ds[i][0] for i in range(n)])
    g = torch.Generator().manual_seed(0)
    y = (x + noise * torch.randn(x.shape, generator=g)).clamp(0, 1)
    return x, y


def _hwc(t):
    return t.permute(1, 2, 0).double().numpy()


def test_psnr_matches_skimage_per_image():
    x, y = _pair()
    ours = psnr(x, y)
    ref = [peak_signal_noise_ratio(_hwc(a), _hwc(b), data_range=1.0) for a, b in zip(x, y)]
    assert ours.shape == (3,)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-4)


def test_psnr_identical_images_is_capped():
    x, _ = _pair(n=2)
    assert torch.allclose(psnr(x, x), torch.full((2,), MAX_PSNR))


def test_ssim_matches_skimage_gaussian_ssim():
    x, y = _pair()
    ours = ssim(x, y)
    ref = [
        structural_similarity(
            _hwc(a),
            _hwc(b),
            channel_axis=2,
            data_range=1.0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        for a, b in zip(x, y)
    ]
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-4)
    assert torch.allclose(ssim(x, x), torch.ones(3), atol=1e-5)


def test_metrics_refuse_mismatched_or_tiny_inputs():
    x, y = _pair()
    with pytest.raises(RFIError, match="same shape"):
        psnr(x, y[:, :, :40])
    with pytest.raises(RFIError, match="too small"):
        ssim(x[..., :8, :8], y[..., :8, :8])


def test_lpips_distance_per_image(tmp_path):
    import torchvision

    torch.manual_seed(0)
    path = tmp_path / "alexnet.pth"
    # Only the convolutional part: the LPIPS trunk reads nothing else from torchvision's file.
    torch.save(torchvision.models.alexnet().features.state_dict(prefix="features."), path)
    model = load_lpips("alex", weights=path)
    x, y = _pair(size=64, n=2, noise=0.2)
    d = lpips_distance(x, y, model, batch_size=1)
    assert d.shape == (2,) and (d > 0).all()
    assert torch.allclose(lpips_distance(x, x, model), torch.zeros(2), atol=1e-6)
    far = lpips_distance(x, (x + 0.5 * torch.randn_like(x)).clamp(0, 1), model)
    assert (far > d).all()
