"""One encoder loader and one embed function for every evaluation path (report, suite, compare)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pcl_ray.config import build_config
from pcl_ray.data import load_split
from pcl_ray.evaluation.features import all_images, embed_split, eval_views, image_blocks, load_encoder
from pcl_ray.methods import build_method


@pytest.fixture(scope="module")
def digits():
    cfg = build_config({"data": {"name": "digits", "test_subset": 100}, "model": {"backbone": "convnet", "width": 8},
                        "method": {"name": "simclr"}, "train": {"batch_size": 64, "warmup_epochs": 0}})
    torch.manual_seed(0)
    state = build_method(cfg, 1).state_dict()
    return cfg, state, load_split(cfg.data, "test")


def test_one_pass_gives_backbone_and_unit_head_rows_as_the_encoder_computes_them(digits):
    cfg, state, test = digits
    enc = load_encoder(cfg, state, test.channels)
    views = eval_views(cfg, test)
    both = embed_split(enc, test, views, batch_size=32)  # several blocks
    assert both["backbone"].shape == (100, enc.backbone_dim) and both["head"].shape == (100, cfg.model.feature_dim)
    np.testing.assert_allclose(np.linalg.norm(both["head"], axis=1), 1.0, rtol=1e-5)
    with torch.no_grad():
        images = views.eval(all_images(test, 8))  # 100 x 1 x 8 x 8
        expected = enc.features(images).numpy()  # 100 x backbone_dim
    np.testing.assert_allclose(both["backbone"], expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(embed_split(enc, test, views, ["head"])["head"], both["head"])
    with pytest.raises(ValueError, match="features must be some of backbone, head"):
        embed_split(enc, test, views, ["logits"])


def test_loader_takes_a_backbone_only_state_unless_the_head_is_needed(digits):
    cfg, state, test = digits
    backbone_only = {k: v for k, v in state.items() if k.startswith("encoder.backbone.")}
    enc = load_encoder(cfg, backbone_only, test.channels)
    assert not enc.training
    for key, value in enc.backbone.state_dict().items():
        assert torch.equal(value, state[f"encoder.backbone.{key}"]), key
    head_cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"feature": "head"})})
    with pytest.raises(ValueError, match="eval.feature=head needs the projection head"):
        load_encoder(head_cfg, backbone_only, test.channels)
    with pytest.raises(ValueError, match="the report needs the projection head"):
        load_encoder(cfg, backbone_only, test.channels, head_for="the report")
    wider = cfg.model_copy(update={"model": cfg.model.model_copy(update={"width": 16})})
    with pytest.raises(ValueError, match="does not fit model="):
        load_encoder(wider, state, test.channels)


def test_image_blocks_resize_to_the_asked_size(digits):
    _, _, test = digits
    blocks = list(image_blocks(test, 16, batch_size=40))
    assert [b.shape[0] for b in blocks] == [40, 40, 20]
    assert all(b.shape[1:] == (1, 16, 16) and b.dtype == torch.uint8 for b in blocks)
    assert torch.equal(all_images(test, 16), torch.cat(blocks))
    assert torch.equal(all_images(test, 8), torch.cat(list(image_blocks(test, 8))))  # native size: as stored
