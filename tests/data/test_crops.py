"""Per-image random-resized crops on the full image (pcl_ray/data/crops.py) against torchvision."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from pcl_ray.data.crops import CropSpec, CroppedViews, crop_box, random_resized_crop
from pcl_ray.data.dataset import FileDecoder, IndexedImages

SIZES = [(500, 375), (375, 500), (640, 480), (300, 300), (1000, 250)]  # (width, height), full-size images


def _images(tmp_path, fmt="JPEG"):
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate(SIZES):
        # a smooth gradient plus noise: distinct left and right halves, so a flip shows
        x = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
        arr = np.clip(x + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)
        path = tmp_path / f"img{i}.{fmt.lower()[:3]}"
        Image.fromarray(arr).save(path, fmt)
        paths.append(str(path))
    return paths


def _stats(boxes, width, height):
    area = np.array([w * h / (width * height) for _, _, w, h in boxes])
    log_ratio = np.array([math.log(w / h) for _, _, w, h in boxes])
    centre_x = np.array([(left + w / 2) / width for left, _, w, _ in boxes])
    return area, log_ratio, centre_x


@pytest.mark.parametrize("width,height", SIZES)
def test_crop_scale_statistics_match_torchvision_random_resized_crop(width, height):
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    spec = CropSpec(224, scale=(0.2, 1.0))
    img = Image.new("RGB", (width, height))
    tv = RandomResizedCrop(224, scale=spec.scale, ratio=spec.ratio)
    n = 4000
    theirs = [(j, i, w, h) for i, j, h, w in (tv.get_params(img, tv.scale, tv.ratio) for _ in range(n))]
    rng = np.random.default_rng(1)
    ours = [crop_box(width, height, spec, rng) for _ in range(n)]
    for a, b in zip(_stats(ours, width, height), _stats(theirs, width, height)):
        # means and quartiles agree within sampling error (4000 draws each)
        assert abs(a.mean() - b.mean()) < 4 * math.hypot(a.std(), b.std()) / math.sqrt(n) + 1e-3
        for q in (0.25, 0.5, 0.75):
            assert abs(np.quantile(a, q) - np.quantile(b, q)) < 0.03 * max(1.0, abs(np.quantile(b, q)))
    area = _stats(ours, width, height)[0]
    assert area.min() >= 0.2 - 0.02 and area.max() <= 1.0  # from the full image, within the scale range


def test_crop_equals_torchvision_resized_crop_of_the_same_box(tmp_path):
    from torchvision.transforms.functional import pil_to_tensor as tv_tensor, resized_crop

    path = _images(tmp_path, fmt="PNG")[0]  # PNG: no draft, the full-resolution decode
    spec = CropSpec(64, flip_p=0.0)
    with Image.open(path) as img:
        box = crop_box(*img.size, spec, np.random.default_rng(3))
        ours = random_resized_crop(img, spec, np.random.default_rng(3), "RGB")
    with Image.open(path) as img:
        left, top, w, h = box
        theirs = resized_crop(img.convert("RGB"), top, left, h, w, [64, 64])
    diff = (tv_tensor(ours).float() - tv_tensor(theirs).float()).abs()
    assert ours.size == (64, 64) and diff.mean() < 2.0


def test_jpeg_draft_decodes_at_a_reduced_scale_keeping_the_crop_at_full_resolution(tmp_path):
    path = tmp_path / "big.jpg"
    Image.fromarray(np.full((1600, 2400, 3), 128, np.uint8)).save(path)
    spec = CropSpec(64, scale=(0.9, 1.0))
    with Image.open(path) as img:
        out = random_resized_crop(img, spec, np.random.default_rng(0), "RGB")
        decoded = img.size  # after draft + convert the file handle's image is the reduced one
    assert out.size == (64, 64)
    # draft reduced the decode (JPEG DCT scaling) but the crop box still has >= 64 pixels per side there
    assert decoded[0] < 2400 and decoded[1] < 1600
    assert min(decoded) * math.sqrt(0.9 * 3 / 4) >= 64


def test_cropped_views_are_seeded_per_epoch_and_index_and_flip(tmp_path):
    paths = _images(tmp_path)
    ds = IndexedImages(labels=np.zeros(len(paths), np.int64), num_classes=1, mean=(0.5,) * 3, std=(0.25,) * 3,
                       decoder=FileDecoder(paths, 224, 3))
    views = CroppedViews(ds, CropSpec(32), views=2, seed=7)
    crops, idx = views[2]
    assert crops.shape == (2, 3, 32, 32) and crops.dtype == torch.uint8 and idx == 2
    again = CroppedViews(ds, CropSpec(32), views=2, seed=7)
    assert torch.equal(again[2][0], crops)  # same (seed, epoch, index): same crops, any process
    again.set_epoch(1)
    assert not torch.equal(again[2][0], crops)  # a new epoch draws new crops
    assert not torch.equal(crops[0], crops[1])  # two independent views
    # whole-image crops with and without flip: the gradient runs the other way
    flipped = CroppedViews(ds, CropSpec(32, scale=(1.0, 1.0), flip_p=1.0), views=1)[3][0][0].float()
    plain = CroppedViews(ds, CropSpec(32, scale=(1.0, 1.0), flip_p=0.0), views=1)[3][0][0].float()
    assert plain[:, :, -4:].mean() > plain[:, :, :4].mean() + 50
    assert flipped[:, :, :4].mean() > flipped[:, :, -4:].mean() + 50


def test_cropped_views_refuse_in_memory_splits_and_bad_images(tmp_path):
    mem = IndexedImages(labels=np.zeros(2, np.int64), num_classes=1, mean=(0.5,), std=(0.25,),
                        tensor=torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="lazily decoded"):
        CroppedViews(mem, CropSpec(8))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    ds = IndexedImages(labels=np.zeros(1, np.int64), num_classes=1, mean=(0.5,) * 3, std=(0.25,) * 3,
                       decoder=FileDecoder([str(bad)], 32, 3))
    with pytest.raises(Exception, match="bad.jpg"):
        CroppedViews(ds, CropSpec(32))[0]


def test_view_maker_skips_the_crop_on_pre_cropped_batches():
    from pcl_ray.data.views import ViewMaker

    maker = ViewMaker("pcl_v2", 32, 3, (0.5,) * 3, (0.25,) * 3, crop_on_device=False)
    batch = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    assert maker(batch, generator=torch.Generator().manual_seed(0)).shape == (4, 3, 32, 32)
    with pytest.raises(ValueError, match="crop_on_device=False"):
        maker(torch.zeros(4, 3, 40, 40, dtype=torch.uint8))


def test_the_eval_view_of_lazy_images_is_resize_256_then_center_crop_224(tmp_path):
    """item i of a lazily decoded split is the ImageNet evaluation view: Resize(256) → CenterCrop(224)."""
    from torchvision import transforms

    rng = np.random.default_rng(7)
    path = tmp_path / "wide.png"
    Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(path)
    got = FileDecoder([str(path)], 224, 3)[0]  # 3×224×224
    with Image.open(path) as img:
        want = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.PILToTensor()])(
            img.convert("RGB"))
    assert got.shape == (3, 224, 224)
    assert torch.equal(got, want)
    # decoding into memory at the images' own size keeps the whole image
    same = FileDecoder([str(path)], 300, 3, eval_view=False)[0]
    with Image.open(path) as img:
        assert torch.equal(same, transforms.PILToTensor()(transforms.CenterCrop(300)(img.convert("RGB"))))
