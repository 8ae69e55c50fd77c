"""The pipeline's ``tune:`` section: a validated :class:`TuneConfig` and a checked search space.

```yaml
tune:
  search_space:                       # dotted config keys -> one distribution each
    method.proto_weight: {grid: [0.0, 0.5, 1.0]}
    train.lr: {loguniform: [0.01, 0.3]}
    estep.num_clusters: {choice: [[10], [10, 50, 200]]}
    train.warmup_epochs: {randint: [0, 4]}    # low inclusive, high exclusive
    method.temperature: {uniform: [0.1, 0.3]}
  num_samples: 1                      # repeats of the grid (random dims are drawn anew each time)
  metric: online/knn_acc              # any per-epoch metric the workers report
  mode: max
  scheduler: asha                     # or {name: asha, grace_period: 2, reduction_factor: 2}; fifo; pbt
  max_concurrent_trials: 1
  trial_resources: {num_workers: 2, cpus_per_worker: 1, actor_cpus: 0, driver_cpus: 0}
```

Every key is checked before anything starts: it must name a config field, must not be one that
routes a run (``tracking.*``, ``ray.address``/``storage_path``/``run_name``), and every edge value of its
distribution (each grid/choice value, both ends of a range) must build a valid
:class:`~pcl_ray.config.ExperimentConfig` together with the rest of the pipeline.
"""

from __future__ import annotations

import copy
import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..config import ConfigError, ExperimentConfig, apply_overrides, build_config, load_yaml

DIST_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
#: keys that decide where a run goes rather than what it learns: never swept
UNSWEEPABLE = ("tracking", "ray.address", "ray.storage_path", "ray.run_name", "ray.object_store_memory_mb")
#: Ray custom resource that holds one trial driver (the Tune function that fits the TorchTrainer)
DRIVER_SLOT = "train_driver_slot"
#: the sweep's own combination check stops after this many full combinations of edge values
MAX_COMBINATIONS_CHECKED = 2048


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SearchDim(_Model):
    """One swept key: exactly one of ``grid``, ``choice``, ``uniform``, ``loguniform``, ``randint``."""

    grid: list[Any] | None = Field(None, min_length=1, description="every value, once per sample")
    choice: list[Any] | None = Field(None, min_length=1, description="one value drawn uniformly per trial")
    uniform: tuple[float, float] | None = Field(None, description="[low, high]")
    loguniform: tuple[float, float] | None = Field(None, description="[low, high], both > 0")
    randint: tuple[int, int] | None = Field(None, description="[low, high): high exclusive")

    @model_validator(mode="after")
    def _exactly_one(self) -> "SearchDim":
        given = [k for k in DIST_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(DIST_KINDS)} (got {given or 'none'})")
        lo_hi = getattr(self, given[0])
        if given[0] in ("uniform", "loguniform", "randint"):
            lo, hi = lo_hi
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError(f"{given[0]}: bounds must be finite, got [{lo}, {hi}]")
            if not lo < hi:
                raise ValueError(f"{given[0]}: low must be below high, got [{lo}, {hi}]")
            if given[0] == "loguniform" and lo <= 0:
                raise ValueError(f"loguniform: low must be > 0, got {lo}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in DIST_KINDS if getattr(self, k) is not None)

    @property
    def args(self) -> Any:
        return getattr(self, self.kind)

    @property
    def categorical(self) -> bool:
        return self.kind in ("grid", "choice")

    def edge_values(self) -> list[Any]:
        """Values to validate: every categorical value, or both ends of a range."""
        if self.categorical:
            return list(self.args)
        lo, hi = self.args
        return [lo, hi - 1] if self.kind == "randint" else [lo, hi]

    def describe(self) -> str:
        if self.categorical:
            return f"{self.kind} {list(self.args)}"
        lo, hi = self.args
        return f"{self.kind} [{lo}, {hi}{')' if self.kind == 'randint' else ']'}"

    def to_tune(self):
        """The Ray Tune domain (or grid) for ``param_space``."""
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.args))
        if self.kind == "choice":
            return tune.choice(list(self.args))
        lo, hi = self.args
        return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[self.kind](lo, hi)

    def to_mutation(self):
        """PBT's ``hyperparam_mutations`` entry: a list for categorical keys, else the domain."""
        return list(self.args) if self.categorical else self.to_tune()


class SchedulerConfig(_Model):
    name: Literal["asha", "fifo", "pbt"] = "asha"
    # ASHA (time unit: epochs, i.e. Tune's training_iteration)
    grace_period: int = Field(1, ge=1, description="ASHA: epochs every trial gets before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1.0, description="ASHA: keep 1/reduction_factor at each rung")
    max_t: int | None = Field(None, ge=1, description="ASHA: epochs at the top rung (None = train.epochs)")
    # PBT
    perturbation_interval: int = Field(2, ge=1, description="PBT: epochs between exploit/explore steps")
    quantile_fraction: float = Field(0.25, gt=0.0, le=0.5)
    resample_probability: float = Field(0.25, ge=0.0, le=1.0)

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


class TrialResources(_Model):
    """What one trial holds. Unset fields keep the pipeline's ``ray.*`` values.

    A trial = its driver (the Tune function; a ``train_driver_slot`` unless ``driver_cpus`` > 0)
    + ``num_workers`` Train workers × ``cpus_per_worker`` + the cluster actor's ``actor_cpus``
    (+ one GPU per worker when ``use_gpu``, + one for the actor when ``estep.backend: gpu``).
    """

    num_workers: int | None = Field(None, gt=0)
    cpus_per_worker: float | None = Field(None, gt=0.0)
    actor_cpus: float | None = Field(None, ge=0.0)
    use_gpu: Literal["auto", True, False] | None = None
    driver_cpus: float = Field(0.0, ge=0.0, description="0 = a train_driver_slot instead of a CPU")

    def ray_overrides(self) -> dict[str, Any]:
        return {f"ray.{k}": v for k in ("num_workers", "cpus_per_worker", "actor_cpus", "use_gpu")
                if (v := getattr(self, k)) is not None}


class TuneConfig(_Model):
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                             description="sweep name prefix (default: the pipeline file's stem)")
    search_space: dict[str, SearchDim] = Field(min_length=1)
    num_samples: int = Field(1, ge=1)
    metric: str = "online/knn_acc"
    mode: Literal["max", "min"] = "max"
    scope: Literal["last", "all"] = Field(
        "last", description="rank trials by their last epoch's metric or by their best epoch")
    scheduler: SchedulerConfig = SchedulerConfig()
    max_concurrent_trials: int | None = Field(None, ge=1, description="None = as many as the CPUs hold")
    trial_resources: TrialResources = TrialResources()
    max_failures: int = Field(1, ge=0, description="Tune restarts of a failed trial driver (Train keeps "
                                                   "its own ray.max_failures for worker failures)")
    seed: int | None = Field(0, description="seed of the random search (None = unseeded)")

    @field_validator("search_space", mode="before")
    @classmethod
    def _lists_are_grids(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: ({"grid": v} if isinstance(v, list) else v) for k, v in value.items()}
        return value


@dataclass
class SweepSpec:
    """A pipeline split into its base config and its validated ``tune:`` section."""

    pipeline: Path
    overrides: list[str]
    base_raw: dict[str, Any]          # pipeline + --set + trial_resources, without `tune:`
    base_cfg: ExperimentConfig
    tune: TuneConfig
    pinned: dict[str, Any] = field(default_factory=dict)  # keys the runner resolved -> the user's value (None: unset)

    @property
    def keys(self) -> list[str]:
        return list(self.tune.search_space)

    def trial_raw(self, values: dict[str, Any]) -> dict[str, Any]:
        return trial_raw(self.base_raw, values)

    def max_epochs(self) -> int:
        dim = self.tune.search_space.get("train.epochs")
        if dim is None:
            return self.base_cfg.train.epochs
        return int(max(dim.edge_values()))

    def trial_footprint(self) -> dict[str, float]:
        """Resources one trial holds at its largest (driver + Train workers + cluster actor)."""
        cfgs = [self.base_cfg]
        for key in ("ray.num_workers", "ray.cpus_per_worker", "ray.actor_cpus"):
            if key in self.tune.search_space:
                cfgs += [build_config(set_path(self.base_raw, key, v)) for v in self.tune.search_space[key].edge_values()]
        cpus = max(c.ray.num_workers * c.ray.cpus_per_worker + (c.ray.actor_cpus if c.needs_estep else 0.0)
                   for c in cfgs)
        return {"CPU": cpus + self.tune.trial_resources.driver_cpus,
                "workers": max(c.ray.num_workers for c in cfgs),
                "actor_cpus": max(c.ray.actor_cpus if c.needs_estep else 0.0 for c in cfgs)}


def _format_validation(err: ValidationError, where: str) -> str:
    lines = [f"invalid `tune:` section ({where}):"]
    for e in err.errors():
        loc = list(e["loc"])
        # dotted config keys are one location part: print them as search_space['train.lr']
        parts = []
        for i, p in enumerate(loc):
            if i > 0 and loc[i - 1] == "search_space":
                parts[-1] += f"[{str(p)!r}]"
            else:
                parts.append(str(p))
        key = "tune." + ".".join(parts) if parts else "tune"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        if e["type"] not in ("extra_forbidden", "missing") and "input" in e and not isinstance(e["input"], dict):
            msg += f" (got {e['input']!r})"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def set_path(raw: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``raw`` with the dotted ``key`` set to ``value`` (a Python value, not YAML text).

    A mapping value for a section (``method.spcl: {weight_proto: 0}``) is merged into that section.
    """
    out = copy.deepcopy(raw)
    node = out
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a value, not a section (setting {key})")
        node = nxt
    old = node.get(parts[-1])
    if isinstance(value, dict) and isinstance(old, dict):  # a section's value: merged into the section
        merged = copy.deepcopy(old)
        for k, v in value.items():
            merged = set_path(merged, k, v)
        node[parts[-1]] = merged
    else:
        node[parts[-1]] = copy.deepcopy(value)
    return out


def trial_raw(base_raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    raw = copy.deepcopy(base_raw)
    for key, value in values.items():
        raw = set_path(raw, key, value)
    return raw


def _check_key(key: str) -> None:
    """``key`` names a field of ExperimentConfig and may be swept."""
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(f"tune.search_space[{key!r}]: empty segment in the key")
    if any(key == u or key.startswith(u + ".") for u in UNSWEEPABLE):
        raise ConfigError(f"tune.search_space[{key!r}]: cannot be swept (it routes the run: "
                          f"{', '.join(UNSWEEPABLE)} are fixed for the whole sweep)")
    model: Any = ExperimentConfig
    for i, part in enumerate(parts):
        fields = getattr(model, "model_fields", None)
        if fields is None:
            raise ConfigError(f"tune.search_space[{key!r}]: {'.'.join(parts[:i])} is a value, not a section")
        if part not in fields:
            where = ".".join(parts[:i]) or "the top level"
            raise ConfigError(f"tune.search_space[{key!r}]: unknown config key ({where} has: "
                              f"{', '.join(sorted(fields))})")
        annotation = fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        if model is None and i < len(parts) - 1:
            raise ConfigError(f"tune.search_space[{key!r}]: {'.'.join(parts[: i + 1])} is a value, not a section")


def _short(exc: ConfigError) -> str:
    """The config's message without the whole input dict that a top-level cross-check error repeats."""
    return re.sub(r" \(got \{.*\}\)$", "", str(exc), flags=re.MULTILINE).replace("Value error, ", "")


def validate_space(base_raw: dict[str, Any], tcfg: TuneConfig) -> None:
    """Fail at once, naming the key, when a swept key or one of its values cannot build a config."""
    for key, dim in tcfg.search_space.items():
        _check_key(key)
        for value in dim.edge_values():
            try:
                build_config(set_path(base_raw, key, value), f"tune.search_space[{key!r}] = {value!r}")
            except ConfigError as exc:
                raise ConfigError(f"tune.search_space[{key!r}]: value {value!r} ({dim.describe()}) is not "
                                  f"valid for this pipeline:\n{_short(exc)}") from None
    # values that are valid one by one can still clash (e.g. warmup_epochs > epochs): try the combinations
    keys = list(tcfg.search_space)
    edges = [tcfg.search_space[k].edge_values() for k in keys]
    if len(keys) > 1 and math.prod(len(e) for e in edges) <= MAX_COMBINATIONS_CHECKED:
        for combo in itertools.product(*edges):
            values = dict(zip(keys, combo))
            try:
                build_config(trial_raw(base_raw, values), "combination")
            except ConfigError as exc:
                shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
                raise ConfigError(f"tune.search_space: the combination {shown} is not valid:\n{_short(exc)}") from None


def check_space_against_data(base_raw: dict[str, Any], tcfg: TuneConfig, base_cfg: ExperimentConfig) -> None:
    """Every edge value of the space against the data it trains on (k below N, batch not above N): what a
    single run checks before it starts, done here for every trial before the sweep starts."""
    import json

    from ..data import check_data
    from ..workflow import preflight

    sizes: dict[str, int] = {}

    def size_of(cfg: ExperimentConfig) -> int:
        key = json.dumps(cfg.data.model_dump(mode="json"), sort_keys=True)
        if key not in sizes:
            sizes[key] = len(check_data(cfg).labels)
        return sizes[key]

    preflight(base_cfg, size_of(base_cfg))
    for key, dim in tcfg.search_space.items():
        for value in dim.edge_values():
            cfg = build_config(set_path(base_raw, key, value), f"tune.search_space[{key!r}] = {value!r}")
            try:
                preflight(cfg, size_of(cfg))
            except ConfigError as exc:
                raise ConfigError(f"tune.search_space[{key!r}]: value {value!r} ({dim.describe()}): {exc}") from None


def _check_metric(tcfg: TuneConfig, cfg: ExperimentConfig) -> None:
    m = tcfg.metric
    if m.startswith("online/") and cfg.eval.online_every == 0 and "eval.online_every" not in tcfg.search_space:
        raise ConfigError(f"tune.metric: {m!r} is measured only when eval.online_every > 0 (it is 0)")
    if m.startswith("eval/"):
        raise ConfigError(f"tune.metric: {m!r} is logged once after training; a sweep needs a metric every "
                          "epoch (e.g. online/knn_acc, loss/total, estep/k<K>/ami_labels)")
    if (m.startswith("estep/") or m.startswith("acc/proto")) and not cfg.needs_estep:
        raise ConfigError(f"tune.metric: {m!r} needs an E-step, which method {cfg.method.name!r} does not run")
    if m.startswith("estep/k"):
        k = m.split("/")[1][1:]
        if k.isdigit() and int(k) not in cfg.estep.num_clusters and "estep.num_clusters" not in tcfg.search_space:
            raise ConfigError(f"tune.metric: {m!r} names k={k}, but estep.num_clusters is {cfg.estep.num_clusters}")


def load_sweep(pipeline: str | Path, overrides: list[str] | None = None) -> SweepSpec:
    """Read a pipeline, apply ``--set`` overrides (``tune.*`` keys included), validate both halves."""
    overrides = list(overrides or [])
    raw = apply_overrides(load_yaml(pipeline), overrides)
    tune_raw = raw.pop("tune", None)
    raw.pop("compare", None)
    if tune_raw is None:
        raise ConfigError(f"{pipeline}: no `tune:` section (a sweep pipeline needs tune.search_space, "
                          "see pipelines/tune_digits_smoke.yaml)")
    if not isinstance(tune_raw, dict):
        raise ConfigError(f"{pipeline}: `tune:` must be a mapping, got {type(tune_raw).__name__}")
    where = str(pipeline) + (" + --set " + " ".join(overrides) if overrides else "")
    try:
        tcfg = TuneConfig.model_validate(tune_raw)
    except ValidationError as err:
        raise ConfigError(_format_validation(err, where)) from None
    for key, value in tcfg.trial_resources.ray_overrides().items():
        raw = set_path(raw, key, value)
    base_cfg = build_config(raw, where)
    validate_space(raw, tcfg)
    _check_metric(tcfg, base_cfg)
    check_space_against_data(raw, tcfg, base_cfg)
    spec = SweepSpec(Path(pipeline), overrides, raw, base_cfg, tcfg)
    if tcfg.scheduler.name == "asha" and tcfg.scheduler.max_t and tcfg.scheduler.max_t > spec.max_epochs():
        raise ConfigError(f"tune.scheduler.max_t ({tcfg.scheduler.max_t}) exceeds train.epochs ({spec.max_epochs()})")
    return spec
