"""Evaluation of frozen representations: kNN, linear probe, low-shot SVM, fine-tuning,
clustering metrics, embedding pictures, exports, and the suite that runs them all; the end-of-run
report of ``train`` (:mod:`.report`) is that suite's kNN, clustering and low-shot parts plus a raw-pixel row.

Pure numpy / torch / faiss / scikit-learn / pyarrow; nothing here knows MLflow (``python run.py eval``
in :mod:`pcl_ray.cli` logs the suite's results), and only :mod:`pcl_ray.evaluation.remote` knows Ray (it
runs the same code as one Ray task on a cluster, importing Ray lazily).
"""

from pcl_ray.evaluation.clustering import cluster_metrics, hungarian_accuracy, kmeans_assign
from pcl_ray.evaluation.embedding_plot import plot_embedding, tsne_2d
from pcl_ray.evaluation.export import backbone_state_dict, export_backbone, export_embeddings, read_embeddings
from pcl_ray.evaluation.features import embed, embed_split, load_encoder, raw_pixel_features
from pcl_ray.evaluation.finetune import FinetuneResult, balanced_subset, finetune_backbone
from pcl_ray.evaluation.knn import knn_accuracies, knn_accuracy, knn_predict, knn_predict_many
from pcl_ray.evaluation.linear_probe import LinearProbeResult, fit_linear_probe
from pcl_ray.evaluation.lowshot import LowShotResult, lowshot_svm
from pcl_ray.evaluation.plots import plot_metric_curves, plot_prototype_stats
from pcl_ray.evaluation.suite import DEFAULT_SUITES, SUITES, parse_suites, run_suite

__all__ = [
    "DEFAULT_SUITES",
    "FinetuneResult",
    "LinearProbeResult",
    "LowShotResult",
    "SUITES",
    "backbone_state_dict",
    "balanced_subset",
    "cluster_metrics",
    "embed",
    "embed_split",
    "export_backbone",
    "export_embeddings",
    "finetune_backbone",
    "hungarian_accuracy",
    "kmeans_assign",
    "load_encoder",
    "knn_accuracies",
    "knn_accuracy",
    "knn_predict",
    "knn_predict_many",
    "fit_linear_probe",
    "lowshot_svm",
    "parse_suites",
    "plot_embedding",
    "plot_metric_curves",
    "plot_prototype_stats",
    "raw_pixel_features",
    "read_embeddings",
    "run_suite",
    "tsne_2d",
]
