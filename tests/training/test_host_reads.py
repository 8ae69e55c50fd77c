"""A training step reads nothing back to the host: no ``.item()``, ``float(t)``, ``int(t)``, ``bool(t)``,
``.tolist()`` or ``.numpy()`` on a tensor anywhere in ``train_step`` (forward, loss, backward, optimizer,
``after_step``) when the caller passes a :class:`~pcl_ray.training.FiniteGuard`.

On a GPU each such read stalls the launch queue until the device catches up. These Python-level reads are
what our code controls; syncs inside torch ops with data-dependent output sizes (SPCL's pair draw sorts and
counts clusters) are not visible here, and ``scripts/gpu_check.sh`` runs a step under
``torch.cuda.set_sync_debug_mode`` on a GPU to catch those.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pcl_ray.config import load_config
from pcl_ray.data import ViewMaker, load_split
from pcl_ray.estep import run_estep
from pcl_ray.methods import build_method
from pcl_ray.training import FiniteGuard, build_optimizer, train_step

TINY = Path(__file__).resolve().parents[2] / "pipelines" / "digits_tiny.yaml"
BATCH = 64
CASES = {
    "moco": ["method.name=moco"],
    "pcl": ["method.name=pcl"],
    "pcl-sampled": ["method.name=pcl", "method.proto_form=sampled", "estep.num_clusters=[100,120]"],
    "simclr": ["method.name=simclr", "method.temperature=0.5"],
    "swav": ["method.name=swav", "method.temperature=0.1", "method.swav.small_crop_size=6",
             "method.swav.num_prototypes=30"],
    "deepcluster": ["method.name=deepcluster", "method.temperature=0.1"],
    "spcl": ["method.name=spcl"],
    "spcl-lite": ["method.name=spcl", "method.spcl.variant=lite"],
}
READS = ("item", "__float__", "__int__", "__bool__", "__index__", "tolist", "numpy")


@pytest.fixture(scope="module")
def digits():
    return load_split(load_config(TINY).data, "train")


def _setup(overrides, ds):
    cfg = load_config(TINY, [*overrides, "train.warmup_epochs=0"])
    torch.manual_seed(0)
    method = build_method(cfg, ds.channels, generator=torch.Generator().manual_seed(0))
    prototypes = None
    if method.needs_estep:
        images = torch.stack([ds[i][0] for i in range(len(ds))])
        eval_view = ViewMaker(cfg.data.views.recipe, ds.image_size, ds.channels, ds.mean, ds.std)
        with torch.no_grad():
            method.estep_module().eval()
            feats = method.embed_for_estep(eval_view.eval(images)).numpy()
            method.estep_module().train()
        options = {"seed": 0, **type(method).estep_options(cfg)}
        pset = run_estep(feats, list(cfg.estep.num_clusters), 0.1, niter=5, nredo=1, backend="cpu",
                         num_threads=1, **options)
        prototypes = pset.to_torch("cpu")
        method.on_prototypes(prototypes)
    gen = torch.Generator().manual_seed(0)
    images = torch.stack([ds[i][0] for i in range(BATCH)])
    makers = [ViewMaker(cfg.data.views.recipe, v.size, ds.channels, ds.mean, ds.std, v.min_scale, v.max_scale)
              for v in method.view_specs(ds.image_size)]
    views = [make(images, generator=gen) for make in makers]
    return cfg, method, views, prototypes


class HostRead(AssertionError):
    pass


def _forbid_reads(monkeypatch):
    def refuse(name):
        def read(self, *args, **kwargs):
            raise HostRead(f"Tensor.{name} read a value back to the host inside a training step")
        return read

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, refuse(name))


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_guarded_step_reads_nothing_back(case, digits, monkeypatch):
    cfg, method, views, prototypes = _setup(CASES[case], digits)
    optimizer = build_optimizer(cfg, method.net.parameters())
    index = torch.arange(BATCH)
    method.net.train()

    def step(n, guard):
        return train_step(method, method.net, optimizer, views, index, prototypes,
                          generator=torch.Generator().manual_seed(n), epoch=0, global_step=n, guard=guard)

    guard = FiniteGuard()
    step(0, guard)  # the first step sets up lazily built state (SPCL's classifier, SwAV's epoch counters)
    with monkeypatch.context() as patch:
        _forbid_reads(patch)
        result = step(1, guard)
    guard.check()
    assert math.isfinite(float(result.loss.detach()))


def test_streaming_a_steps_embeddings_reads_nothing_back(monkeypatch):
    """``estep.features=stream``: each step's (B, d) embeddings are kept with a device-side copy; the rows
    reach the host once, at the E-step (:meth:`StreamedEmbeddings.shard`)."""
    from pcl_ray.training import StreamedEmbeddings

    buf = StreamedEmbeddings(epoch=0, capacity=2 * BATCH)
    emb = [torch.randn(BATCH, 16) for _ in range(2)]
    with monkeypatch.context() as patch:
        _forbid_reads(patch)
        for n, e in enumerate(emb):
            buf.add(torch.arange(n * BATCH, (n + 1) * BATCH), e, "pcl")
    idx, rows = buf.shard()
    assert idx.tolist() == list(range(2 * BATCH)) and np.array_equal(rows, torch.cat(emb).numpy())


def test_the_patch_catches_a_read(monkeypatch):
    """The check above can fail: a step that reads a value back is caught."""
    with monkeypatch.context() as patch:
        _forbid_reads(patch)
        with pytest.raises(HostRead):
            float(torch.ones(()))
        with pytest.raises(HostRead):
            torch.ones(()).item()


def test_the_guard_defers_and_names_the_first_bad_step(digits):
    cfg, method, views, prototypes = _setup(CASES["moco"], digits)
    optimizer = build_optimizer(cfg, method.net.parameters())
    bad = [torch.full_like(v, float("nan")) for v in views]
    guard = FiniteGuard()
    for n, v in enumerate([views, bad, bad]):
        train_step(method, method.net, optimizer, v, torch.arange(BATCH), None, generator=None, epoch=4,
                   global_step=10 + n, guard=guard)  # no raise: the guard only notes the step
    with pytest.raises(FloatingPointError, match=r"epoch 5 step 11: .*loss/info_nce.: nan"):
        guard.check()


def test_a_clean_guard_passes():
    guard = FiniteGuard()
    guard.check()  # nothing noted
    guard.note(torch.tensor(1.0), {"a": torch.tensor(2.0)}, epoch=0, global_step=0)
    guard.check()
