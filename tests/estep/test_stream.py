"""``estep.features=stream``: the E-step clusters the M-step's embeddings of the previous epoch.

Unit: the streamed shards plus the fresh pass over the unseen images cover the index space exactly once
(else the cluster actor would never start). Integration (Ray): a PCL run on digits uses streamed
embeddings at every E-step after the first epoch, a resumed one too (the checkpoint holds each rank's rows).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pcl_ray.config import load_config
from pcl_ray.estep.prototypes import PrototypeTensors
from pcl_ray.training import StreamedEmbeddings
from pcl_ray.training import EpochPlan

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("n", "world", "batch"), [(1500, 2, 128), (1797, 3, 150), (1000, 1, 128), (640, 2, 128)])
def test_streamed_and_unseen_indices_cover_every_image_once(n, world, batch):
    for epoch in range(3):
        plan = EpochPlan(n, batch, 7, epoch)
        parts = [plan.rank_indices(r, world) for r in range(world)]
        rest = plan.untrained()
        parts += [rest[r::world] for r in range(world)]
        every = np.concatenate(parts)
        assert len(every) == n and np.array_equal(np.sort(every), np.arange(n))
        assert len(rest) == n - plan.steps * batch


def test_streamed_embeddings_keep_rows_with_their_indices():
    buf = StreamedEmbeddings(epoch=3, capacity=6)
    buf.add(torch.tensor([5, 1, 4]), torch.arange(6.0).view(3, 2), "pcl")
    buf.add(torch.tensor([0, 2, 3]), torch.arange(6.0, 12.0).view(3, 2), "pcl")
    idx, emb = buf.shard()
    assert idx.tolist() == [5, 1, 4, 0, 2, 3]
    assert emb.dtype == np.float32 and emb[0].tolist() == [0.0, 1.0] and emb[5].tolist() == [10.0, 11.0]
    with pytest.raises(RuntimeError, match="estep.features=stream: method 'x' returns no stream_embedding"):
        buf.add(torch.tensor([1]), None, "x")
    # what a checkpoint keeps of it comes back whole (weights_only), rows with their indices
    back = StreamedEmbeddings.from_state(torch.load(_saved(buf.state_dict()), weights_only=True))
    b_idx, b_emb = back.shard()
    assert back.epoch == 3 and b_idx.tolist() == idx.tolist() and np.array_equal(b_emb, emb)
    with pytest.raises(RuntimeError, match="nothing was added"):
        StreamedEmbeddings(epoch=0, capacity=2).shard()


def _saved(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_every_e_step_method_returns_its_stream_embedding():
    from pcl_ray.methods import METHODS, build_method

    for name, cls in METHODS.items():
        if not cls.needs_estep:
            continue
        warmup = 0 if name == "deepcluster" else 1
        cfg = load_config(ROOT / "pipelines" / "digits_tiny.yaml",
                          [f"method.name={name}", f"train.warmup_epochs={warmup}", "ray.num_workers=1"])
        torch.manual_seed(0)
        method = build_method(cfg, 1, generator=torch.Generator().manual_seed(0))
        x = torch.rand(8, 1, 8, 8)
        views = [x + 0.01 * torch.randn_like(x) for _ in method.view_specs(8)]
        k = cfg.estep.num_clusters
        prototypes = [PrototypeTensors(torch.randint(0, kk, (8,)),
                                       torch.nn.functional.normalize(torch.randn(kk, cfg.model.feature_dim), dim=1),
                                       torch.full((kk,), 0.2)) for kk in k] if name != "pcl" else None
        if prototypes is not None:
            method.on_prototypes(prototypes)
        result = method.training_loss(method.net, views, torch.arange(8), prototypes, generator=torch.Generator(),
                                      epoch=1)
        emb = result.stream_embedding
        assert emb is not None and emb.shape == (8, type(method).estep_dim(cfg)) and not emb.requires_grad, name
        method.estep_module().eval()
        with torch.no_grad():  # the same space as the eval pass: the E-step's dimension, unit rows if its are
            ref = method.embed_for_estep(x)
        assert ref.shape == emb.shape, name
        unit = torch.allclose(ref.norm(dim=1), torch.ones(8), atol=1e-5)
        assert unit == torch.allclose(emb.norm(dim=1), torch.ones(8), atol=1e-5), name


@pytest.mark.ray
def test_pcl_run_clusters_streamed_embeddings_before_and_after_a_resume(ray_local, tmp_path):
    from mlflow.tracking import MlflowClient

    from pcl_ray.workflow import train

    from pcl_ray.distributed.fault_injection import KILL_FILE

    cfg = load_config(ROOT / "pipelines" / "digits_tiny.yaml", [
        "train.epochs=4", "train.warmup_epochs=1", "estep.features=stream", "ray.max_failures=1",
        f"ray.storage_path={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'db'}",
        "tracking.experiment=stream", "eval.enabled=false"])
    # rank 0 dies in epoch 4: the restarted workers resume after epoch 3 with the streamed embeddings that
    # epoch 3's checkpoint holds (one file per rank)
    (tmp_path / "runs" / "it-stream").mkdir(parents=True)
    (tmp_path / "runs" / "it-stream" / KILL_FILE).write_text("3:1:0")
    out = train(cfg, run_name="it-stream")
    client = MlflowClient(out.tracking_uri)
    source = client.get_metric_history(out.mlflow_run_id, "estep/from_stream")
    # epochs 2, 3 and 4 cluster epoch 1's, 2's and 3's M-step embeddings, epoch 4 after the resume too
    assert [(m.step, m.value) for m in source] == [(2, 1.0), (3, 1.0), (4, 1.0)]
    checkpoints = sorted(p for p in (tmp_path / "runs" / "it-stream").glob("checkpoint_*") if p.is_dir())
    assert checkpoints and {p.name for p in checkpoints[-2].glob("stream_*")} == {"stream_0_of_2.pt", "stream_1_of_2.pt"}
    ami = client.get_metric_history(out.mlflow_run_id, "estep/k10/ami_labels")
    assert [m.step for m in ami] == [2, 3, 4] and all(0.0 <= m.value <= 1.0 for m in ami)
    assert client.get_run(out.mlflow_run_id).data.params["estep.features"] == "stream"
