"""Hyperparameter sweeps and ablations: Ray Tune around the whole training workflow.

- :mod:`.spec`    the pipeline's ``tune:`` section (pydantic :class:`TuneConfig`), search-space validation
- :mod:`.trial`   the Tune trainable: one full ``workflow.train`` run (TorchTrainer + cluster actor) per trial
- :mod:`.runner`  local/remote Ray, the Tuner (new or restored), the MLflow parent run, early-stop marking
- :mod:`.report`  the results table (printed + CSV), plots, the best config as a pipeline file

The CLI verb (``python run.py tune``) lives in :mod:`pcl_ray.tune`.
"""

from .spec import SearchDim, TuneConfig, load_sweep

__all__ = ["SearchDim", "TuneConfig", "load_sweep"]
