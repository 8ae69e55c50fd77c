"""Evaluation of frozen representations: kNN, clustering metrics, features, plots.

Pure numpy / torch / faiss / scikit-learn; nothing here knows Ray or MLflow.
"""

from pcl_ray.evaluation.clustering import cluster_metrics, hungarian_accuracy, kmeans_assign
from pcl_ray.evaluation.features import embed, raw_pixel_features
from pcl_ray.evaluation.knn import knn_accuracy, knn_predict
from pcl_ray.evaluation.plots import plot_metric_curves, plot_prototype_stats

__all__ = [
    "cluster_metrics",
    "embed",
    "hungarian_accuracy",
    "kmeans_assign",
    "knn_accuracy",
    "knn_predict",
    "plot_metric_curves",
    "plot_prototype_stats",
    "raw_pixel_features",
]
