"""Exports for use outside pcl_ray: embeddings as Parquet, the backbone as a plain state dict.

Embeddings
    One row per image: ``split`` (string), ``index`` (int64, the dataset index
    within its split), ``label`` (int64, ``-1`` when unknown) and ``embedding``
    (``fixed_size_list<float32>[d]``). The schema metadata records the feature
    kind and width. Read it back with :func:`read_embeddings`, or with any
    Arrow reader, e.g.::

        t = pyarrow.parquet.read_table("embeddings.parquet")
        x = t["embedding"].combine_chunks().flatten().to_numpy().reshape(len(t), -1)

Backbone
    ``torch.save`` of the backbone's ``state_dict`` (keys without the
    ``encoder.backbone.`` prefix), the same file the training run logs as
    ``model/backbone.pt``. It loads into plain models:

    * ``convnet``: ``pcl_ray.models.ConvNet(in_channels, width)``, strictly.
    * ``resnet18`` / ``resnet50``: torchvision's model with the small-image stem
      the backbone was trained with, then ``strict=False`` (only ``fc.*`` is
      missing: the classifier is yours to train)::

          net = torchvision.models.resnet18(num_classes=10)
          net.conv1 = torch.nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
          net.maxpool = torch.nn.Identity()
          missing, unexpected = net.load_state_dict(torch.load("backbone.pt"), strict=False)
          # missing == ["fc.weight", "fc.bias"], unexpected == []

MLflow Models
    A training run logs two MLflow PyTorch models (:func:`log_mlflow_models`): ``backbone`` (pooled
    backbone features) and ``encoder`` (backbone + projection head, the L2-normalised embedding), each an
    :class:`ExportedEncoder` that takes ``B x C x S x S`` float32 images in [0, 1] and normalises them
    itself, saved as a ``torch.export`` program (MLflow's ``pt2`` format: loading needs torch, not
    pcl-ray; any batch size). Signature, input example and the normalisation (``mean``, ``std``,
    ``input_size``, ``channels``) and the run's config (``pcl_ray_config``) are in the model's metadata::

        model = mlflow.pytorch.load_model("runs:/<run id>/backbone")   # or "models:/<name>/<version>"
        features = model(images)                                      # B x backbone_dim
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

__all__ = ["BACKBONE_PREFIX", "MODEL_NAMES", "ExportedEncoder", "backbone_state_dict", "export_backbone",
           "export_embeddings", "is_model_uri", "load_mlflow_model", "log_mlflow_models", "read_embeddings"]

BACKBONE_PREFIX = "encoder.backbone."
MODEL_NAMES = ("backbone", "encoder")  # the MLflow models a training run logs
MODEL_URI_SCHEMES = ("models:/", "runs:/")


def export_embeddings(
    path: str | os.PathLike[str],
    parts: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    feature: str = "backbone",
) -> Path:
    """Write embeddings and labels of one or more splits to one Parquet file.

    Args:
        path: output file (parent folders are created).
        parts: split name -> ``(features (N, d), labels (N,))``; row ``i`` of a
            split gets ``index = i``.
        feature: what the embeddings are (``backbone`` or ``head``), stored in the
            schema metadata.

    Returns:
        The path written.
    """
    if not parts:
        raise ValueError("nothing to export")
    tables, dims = [], set()
    for split, (feats, labels) in parts.items():
        x = np.ascontiguousarray(feats, dtype=np.float32)
        y = np.asarray(labels).astype(np.int64).ravel()
        if x.ndim != 2 or x.shape[0] != y.size:
            raise ValueError(f"split {split!r}: features {x.shape} and labels ({y.size},) do not match")
        dims.add(x.shape[1])
        emb = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel(), type=pa.float32()), x.shape[1])
        tables.append(pa.table({
            "split": pa.array([split] * y.size, type=pa.string()),
            "index": pa.array(np.arange(y.size, dtype=np.int64)),
            "label": pa.array(y),
            "embedding": emb,
        }))
    if len(dims) != 1:
        raise ValueError(f"splits have different embedding widths: {sorted(dims)}")
    table = pa.concat_tables(tables)
    table = table.replace_schema_metadata({"pcl_ray.feature": feature, "pcl_ray.dim": str(dims.pop())})
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out)
    return out


def read_embeddings(path: str | os.PathLike[str], split: str | None = None) -> dict[str, np.ndarray]:
    """Read a file written by :func:`export_embeddings`.

    Returns:
        ``{"embedding": (N, d) float32, "label": (N,) int64, "index": (N,) int64,
        "split": (N,) str}``, optionally restricted to one ``split``.
    """
    table = pq.read_table(path)
    if split is not None:
        table = table.filter(pc.equal(table["split"], split))
    n = table.num_rows
    emb = table["embedding"].combine_chunks()
    width = emb.type.list_size
    return {
        "embedding": emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(n, width),
        "label": table["label"].to_numpy(),
        "index": table["index"].to_numpy(),
        "split": np.asarray(table["split"].to_pylist(), dtype=str),
    }


def backbone_state_dict(method_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The online encoder's backbone weights from a method state dict, prefix stripped."""
    out = {k[len(BACKBONE_PREFIX):]: v.detach().cpu().clone() for k, v in method_state.items()
           if k.startswith(BACKBONE_PREFIX)}
    if not out:
        raise KeyError(f"no '{BACKBONE_PREFIX}*' weights in the method state")
    return out


def export_backbone(method_state: Mapping[str, torch.Tensor], path: str | os.PathLike[str]) -> Path:
    """``torch.save`` the backbone state dict (see the module docstring for loading it)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(backbone_state_dict(method_state), out)
    return out


# ----------------------------------------------------------------------------------- MLflow Models


class ExportedEncoder(torch.nn.Module):
    """A trained encoder with its input normalisation, as logged to MLflow.

    ``output="backbone"``: pooled backbone features ``B x backbone_dim``; ``"embedding"``: the projection
    head's L2-normalised output ``B x feature_dim`` (the space the method contrasts and clusters in).
    Input: ``B x channels x input_size x input_size`` float32 in [0, 1].
    """

    def __init__(self, encoder: torch.nn.Module, mean, std, input_size: int, output: str = "backbone"):
        super().__init__()
        if output not in ("backbone", "embedding"):
            raise ValueError(f"output must be 'backbone' or 'embedding', got {output!r}")
        self.encoder = encoder
        self.output = output
        self.input_size = int(input_size)
        self.register_buffer("mean", torch.tensor([float(m) for m in mean]).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor([float(v) for v in std]).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std  # x: B x C x S x S, normalised as in training
        h = self.encoder.features(x)  # h: B x backbone_dim
        if self.output == "backbone":
            return h
        return torch.nn.functional.normalize(self.encoder.head(h), dim=1)  # B x feature_dim, unit rows


def is_model_uri(spec: str) -> bool:
    """``models:/NAME/VERSION`` (or ``models:/NAME@alias``) and ``runs:/RUN_ID/PATH``."""
    return spec.startswith(MODEL_URI_SCHEMES)


def _with_tracking(uri: str):
    """Point MLflow's fluent API (log_model, load_model, the registry) at ``uri`` for a ``with`` block."""
    import contextlib

    import mlflow

    @contextlib.contextmanager
    def scope():
        before = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
        mlflow.set_tracking_uri(uri)
        try:
            yield mlflow
        finally:
            mlflow.set_tracking_uri(before or "")

    return scope()


def log_mlflow_models(tracking_uri: str, run_id: str, cfg, method_state: Mapping[str, torch.Tensor], *,
                      mean, std, channels: int, input_size: int, register: str | None = None) -> dict[str, str]:
    """Log the run's ``backbone`` and ``encoder`` as MLflow PyTorch models (see the module docstring).

    ``register``: a Model Registry name for the backbone model (``train --register NAME``). Returns
    ``{model name: model URI}`` (``models:/NAME/VERSION`` for the registered one, ``runs:/...`` otherwise).
    """
    import mlflow.pytorch
    from mlflow.models import infer_signature

    from ..models import build_encoder

    enc = build_encoder(cfg.model, channels)
    state = {k[len("encoder."):]: v for k, v in method_state.items() if k.startswith("encoder.")}
    enc.load_state_dict(state)
    enc.eval()
    gen = torch.Generator().manual_seed(0)
    example = torch.rand(2, channels, input_size, input_size, generator=gen)  # 2 x C x S x S in [0, 1]
    metadata = {"mean": [float(m) for m in mean], "std": [float(v) for v in std], "channels": int(channels),
                "input_size": int(input_size), "input": "B x C x S x S float32 in [0, 1], normalised inside",
                "pcl_ray_method": cfg.method.name, "pcl_ray_config": cfg.public_dict()}
    requirements = [f"torch=={torch.__version__.split('+')[0]}"]  # a torch.export program: no pcl-ray needed
    out = {}
    with _with_tracking(tracking_uri) as mlflow:
        # The model belongs to the run's experiment (log_model alone, without an active run, would file it
        # under the default experiment, where runs:/<run id>/<name> does not find it).
        experiment_id = mlflow.MlflowClient(tracking_uri).get_run(run_id).info.experiment_id
        for name, output in (("backbone", "backbone"), ("encoder", "embedding")):
            model = ExportedEncoder(enc, mean, std, input_size, output).eval()
            with torch.no_grad():
                y = model(example)  # 2 x d
            logged = mlflow.initialize_logged_model(name=name, source_run_id=run_id, experiment_id=experiment_id,
                                                    tags={"pcl_ray.output": output})
            info = mlflow.pytorch.log_model(
                model, name=name, run_id=run_id, model_id=logged.model_id,
                signature=infer_signature(example.numpy(), y.numpy()),
                input_example=example.numpy(), metadata={**metadata, "output": output},
                pip_requirements=requirements, serialization_format="pt2",
                registered_model_name=register if name == "backbone" else None)
            version = getattr(info, "registered_model_version", None)
            out[name] = f"models:/{register}/{version}" if register and name == "backbone" and version \
                else f"runs:/{run_id}/{name}"
    return out


def load_mlflow_model(model_uri: str, tracking_uri: str):
    """``(model, metadata, source run id)`` of a model train logged (``models:/...`` or ``runs:/...``):
    the loaded :class:`ExportedEncoder` program (its state dict keys: ``mean``, ``std``, ``encoder.*``).

    Raises:
        LookupError: the store does not know the model, or it is not one pcl-ray logged.
    """
    from mlflow.exceptions import MlflowException

    from ..secrets import redact

    with _with_tracking(tracking_uri) as mlflow:
        try:
            info = mlflow.models.get_model_info(model_uri)
            model = mlflow.pytorch.load_model(model_uri, map_location="cpu")
        except (MlflowException, OSError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise LookupError(f"{model_uri}: no such MLflow model in {redact(tracking_uri)} ({first})") from None
    metadata = dict(info.metadata or {})
    if "pcl_ray_config" not in metadata or not any(k.startswith("encoder.") for k in model.state_dict()):
        raise LookupError(f"{model_uri}: not a model logged by pcl-ray train (expected encoder.* weights and "
                          "pcl_ray_config metadata)")
    return model, metadata, info.run_id
