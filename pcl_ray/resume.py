"""What a resumed run may change: the keys that do not alter what it trains.

A run resumed with another schedule, model, data or method would silently become a different experiment
(e.g. another ``train.epochs`` reshapes the cosine schedule from the resume point on). ``--resume`` compares
the config a run started with (kept in the run registry) with the new one and refuses any change outside
:data:`SAFE_ON_RESUME`, listing every changed key.
"""

from __future__ import annotations

from typing import Any

from .config import ConfigError, ExperimentConfig, _flatten

# Where the run executes, where it logs, how it is evaluated afterwards: safe to change on resume.
SAFE_ON_RESUME = (
    "tracking.", "eval.",
    "ray.address", "ray.connect_timeout_s", "ray.max_failures", "ray.use_gpu", "ray.num_workers",
    "ray.min_workers", "ray.cpus_per_worker", "ray.actor_cpus", "ray.object_store_memory_mb",
    "ray.storage_path", "ray.storage_endpoint", "ray.run_name",
    "train.log_every", "train.keep_checkpoints",
    "data.root", "data.download", "data.views.loader_workers",
    "estep.num_threads", "estep.backend",
)


def _safe(key: str) -> bool:
    return any(key == s or (s.endswith(".") and key.startswith(s)) for s in SAFE_ON_RESUME)


def changed_keys(saved: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, new value)`` for every dotted key that differs and is not safe to change."""
    old_flat, new_flat = dict(_flatten(saved)), dict(_flatten(new))
    keys = sorted(set(old_flat) | set(new_flat))
    return [(k, old_flat.get(k), new_flat.get(k)) for k in keys
            if not _safe(k) and old_flat.get(k) != new_flat.get(k)]


def check_resume(saved: dict[str, Any] | None, cfg: ExperimentConfig, run_name: str) -> None:
    """Refuse resuming ``run_name`` (started with config ``saved``) under a config that trains differently."""
    if saved is None:  # a run recorded before configs were kept: nothing to compare with
        return
    diff = changed_keys(saved, cfg.public_dict())
    if diff:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in diff)
        raise ConfigError(f"--resume {run_name}: the new config changes what the run trains ({listed}); resume "
                          "with the run's own pipeline and overrides, or start a new run (only where and how it "
                          "runs may change: ray.*, tracking.*, eval.*, data.root, train.log_every ...)")
