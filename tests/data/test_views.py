"""Batched view recipes (pcl_ray.data.views)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pcl_ray.data import Recipe, ViewMaker
from pcl_ray.data.views import _axis_aligned_grid, _gaussian_blur, _shift_hue, blur_kernel_size

MEAN1, STD1 = (0.3,), (0.25,)
MEAN3, STD3 = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
#: crop and flip only: no colour, no blur
PLAIN = Recipe(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, flip_p=0.0)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def batch(n: int = 8, c: int = 1, size: int = 28, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, size, size), generator=g, dtype=torch.uint8)


def normalized(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (x.float() / 255.0 - m) / s


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("recipe", ["pcl_v1", "pcl_v2"])
@pytest.mark.parametrize("channels, in_size, out_size", [(1, 28, 28), (3, 32, 24), (1, 8, 16)])
def test_shape_dtype_device(recipe: str, channels: int, in_size: int, out_size: int, device: str) -> None:
    mean, std = (MEAN1, STD1) if channels == 1 else (MEAN3, STD3)
    vm = ViewMaker(recipe, out_size, channels, mean, std)
    x = batch(16, channels, in_size).to(device)
    view = vm(x)
    assert view.shape == (16, channels, out_size, out_size) and view.dtype == torch.float32
    assert view.device.type == device and torch.isfinite(view).all()
    # values stay inside the normalised image of [0, 1]
    lo = (0.0 - torch.tensor(mean)) / torch.tensor(std)
    hi = (1.0 - torch.tensor(mean)) / torch.tensor(std)
    per_channel = view.transpose(0, 1).reshape(channels, -1).cpu()
    assert (per_channel.min(1).values >= lo - 1e-4).all() and (per_channel.max(1).values <= hi + 1e-4).all()


@pytest.mark.parametrize("recipe", ["pcl_v1", "pcl_v2"])
def test_seeded_generator_is_deterministic(recipe: str) -> None:
    vm = ViewMaker(recipe, 32, 3, MEAN3, STD3)
    x = batch(32, 3, 32)
    a = vm(x, torch.Generator().manual_seed(7))
    b = vm(x, torch.Generator().manual_seed(7))
    c = vm(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for u, v in zip(vm.make_views(x, 3, generator=g1), vm.make_views(x, 3, generator=g2)):
        assert torch.equal(u, v)


def test_two_views_differ() -> None:
    vm = ViewMaker("pcl_v2", 28, 1, MEAN1, STD1)
    v1, v2 = vm.make_views(batch(64), n=2, generator=torch.Generator().manual_seed(0))
    assert v1.shape == v2.shape == (64, 1, 28, 28)
    differs = (v1 - v2).abs().flatten(1).amax(1) > 1e-3
    assert differs.float().mean() > 0.9


def test_full_scale_crop_without_flip_is_identity() -> None:
    # Scale 1 fits no crop box of ratio ≠ 1: the fallback is the whole image, centred.
    x = batch(16, 3, 20)
    vm = ViewMaker(PLAIN, 20, 3, MEAN3, STD3, crop_min_scale=1.0)
    out = vm(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, normalized(x, MEAN3, STD3), atol=1e-4, rtol=0)
    torch.testing.assert_close(out, vm.eval(x))


def test_flip_only_mirrors() -> None:
    x = batch(8, 1, 12)
    vm = ViewMaker(Recipe(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, flip_p=1.0), 12, 1, MEAN1, STD1,
                   crop_min_scale=1.0)  # fmt: skip
    torch.testing.assert_close(vm(x), normalized(x.flip(-1), MEAN1, STD1), atol=1e-4, rtol=0)


def test_full_scale_crop_upsamples() -> None:
    # 8×8 → 16×16 by the crop resampling: same as bilinear interpolation (align_corners=False).
    x = batch(4, 1, 8)
    vm = ViewMaker(PLAIN, 16, 1, (0.0,), (1.0,), crop_min_scale=1.0)
    expected = F.interpolate(x.float() / 255.0, size=16, mode="bilinear", align_corners=False)
    torch.testing.assert_close(vm(x), expected, atol=1e-4, rtol=0)


def test_crops_zoom_in() -> None:
    # A small crop of a smooth gradient spans a smaller value range than the whole image.
    ramp = torch.linspace(0, 255, 32).round().to(torch.uint8).view(1, 1, 1, 32).expand(64, 1, 32, 32).contiguous()
    vm = ViewMaker(PLAIN, 32, 1, (0.0,), (1.0,), crop_min_scale=0.2, crop_max_scale=0.3)
    out = vm(ramp, torch.Generator().manual_seed(1))
    span = out.flatten(1).amax(1) - out.flatten(1).amin(1)
    assert (span < 0.8).all()


def test_grid_matches_affine_grid() -> None:
    g = torch.Generator().manual_seed(0)
    theta = torch.rand(5, 4, generator=g) * 2 - 1
    full = torch.zeros(5, 2, 3)
    full[:, 0, 0], full[:, 0, 2], full[:, 1, 1], full[:, 1, 2] = theta.unbind(1)
    expected = F.affine_grid(full, [5, 1, 9, 9], align_corners=False)
    torch.testing.assert_close(_axis_aligned_grid(theta, 9), expected)


def test_blur_preserves_mean_and_constants() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 28, 28, generator=g)
    sigma = torch.linspace(0.1, 2.0, 6)
    out = _gaussian_blur(x, sigma, blur_kernel_size(28))
    assert out.shape == x.shape
    torch.testing.assert_close(out.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=5e-3, rtol=0)
    assert out[-1].std() < x[-1].std()  # σ = 2 smooths
    const = torch.full((2, 1, 10, 10), 0.37)
    torch.testing.assert_close(_gaussian_blur(const, torch.tensor([0.5, 2.0]), 3), const)
    impulse = _gaussian_blur(x, torch.full((6,), 1e-3), 5)  # vanishing σ: unchanged
    torch.testing.assert_close(impulse, x)


def test_blur_kernel_size() -> None:
    assert [blur_kernel_size(s) for s in (8, 28, 32, 96, 224)] == [3, 3, 3, 11, 23]


def test_hue_shift_matches_torchvision() -> None:
    from torchvision.transforms.functional import adjust_hue

    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 10, 10, generator=g)
    x[0, :, :2] = 0.5  # some grey pixels
    shifts = torch.tensor([-0.1, 0.0, 0.05, 0.3])
    out = _shift_hue(x, shifts)
    expected = torch.stack([adjust_hue(x[i], float(shifts[i])) for i in range(4)])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_eval_is_deterministic_and_normalized() -> None:
    x = batch(8, 1, 28)
    vm = ViewMaker("pcl_v2", 28, 1, MEAN1, STD1)
    a, b = vm.eval(x), vm.eval(x)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, normalized(x, MEAN1, STD1))
    up = ViewMaker("pcl_v1", 32, 1, MEAN1, STD1).eval(x)
    assert up.shape == (8, 1, 32, 32)
    resized = F.interpolate(x.float() / 255.0, size=32, mode="bilinear", align_corners=False, antialias=True)
    expected = (resized - 0.3) / 0.25
    torch.testing.assert_close(up, expected)


def test_one_channel_recipes_leave_gray_ops_out() -> None:
    # Grayscale on a 1-channel batch is a no-op, so a grayscale-only recipe is the identity.
    x = batch(8, 1, 16)
    vm = ViewMaker(Recipe(jitter_p=0.0, grayscale_p=1.0, blur_p=0.0, flip_p=0.0), 16, 1, MEAN1, STD1,
                   crop_min_scale=1.0)  # fmt: skip
    torch.testing.assert_close(vm(x), vm.eval(x))


def test_grayscale_always_gives_equal_channels() -> None:
    vm = ViewMaker(Recipe(jitter_p=0.0, grayscale_p=1.0, blur_p=0.0), 16, 3, (0.0,) * 3, (1.0,) * 3)
    out = vm(batch(8, 3, 16))
    torch.testing.assert_close(out[:, 0], out[:, 1])
    torch.testing.assert_close(out[:, 1], out[:, 2])


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="recipe"):
        ViewMaker("pcl_v9", 28, 1, MEAN1, STD1)
    with pytest.raises(ValueError, match="channels"):
        ViewMaker("pcl_v1", 28, 2, (0.5, 0.5), (0.5, 0.5))
    with pytest.raises(ValueError, match="crop_min_scale"):
        ViewMaker("pcl_v1", 28, 1, MEAN1, STD1, crop_min_scale=0.0)
    vm = ViewMaker("pcl_v1", 28, 1, MEAN1, STD1)
    with pytest.raises(ValueError, match="B×1×H×W"):
        vm(batch(4, 3, 28))
