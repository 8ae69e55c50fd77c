"""The augmentations one method trains on, built from the config and the data set's statistics."""

from __future__ import annotations

from ..data import ViewMaker


def build_view_makers(method, cfg, ds) -> tuple[list[ViewMaker], ViewMaker]:
    """One ViewMaker per view the method asks for, plus the deterministic evaluation transform."""
    size = ds.image_size

    def make(spec_size: int, lo: float, hi: float) -> ViewMaker:
        return ViewMaker(cfg.data.views.recipe, spec_size, ds.channels, ds.mean, ds.std,
                         crop_min_scale=lo, crop_max_scale=hi)

    makers = [make(v.size, v.min_scale, v.max_scale) for v in method.view_specs(size)]
    return makers, make(size, cfg.data.views.crop_min_scale, 1.0)
