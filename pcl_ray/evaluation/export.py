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

__all__ = ["BACKBONE_PREFIX", "backbone_state_dict", "export_backbone", "export_embeddings", "read_embeddings"]

BACKBONE_PREFIX = "encoder.backbone."


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
