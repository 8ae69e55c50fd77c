"""Typed, validated experiment configuration.

A pipeline is a YAML file whose top-level sections mirror :class:`ExperimentConfig`.
Command-line overrides are dotted keys (``train.epochs=3``); their values are parsed
as YAML scalars/lists (``estep.num_clusters=[10,20]``). Any unknown key or bad value
raises :class:`ConfigError` naming the key and what was expected.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError


def _registered(value: str, registry: dict[str, Any]) -> str:
    """``value`` when it names an entry of ``registry``, else the error a ``Literal`` of its names gives.

    Data sets, view recipes and methods are named once, by their registries (``pcl_ray.data.DATA_SOURCES``,
    ``pcl_ray.data.RECIPES``, ``pcl_ray.methods.METHODS``); the sections below look them up at validation
    time, not at import, since both packages import this module.
    """
    if value not in registry:
        names = [repr(n) for n in registry]
        expected = f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]
        raise PydanticCustomError("literal_error", "Input should be {expected}", {"expected": expected})
    return value


class ConfigError(ValueError):
    """A pipeline file or override is invalid. The message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ViewConfig(_Section):
    recipe: str = Field("pcl_v2", description="an augmentation recipe of pcl_ray.data.RECIPES")
    crop_min_scale: float = Field(0.2, gt=0.0, le=1.0)
    loader_workers: int = Field(0, ge=0)

    @field_validator("recipe")
    @classmethod
    def _known_recipe(cls, recipe: str) -> str:
        from .data import RECIPES

        return _registered(recipe, RECIPES)


class DataConfig(_Section):
    name: str = Field("fashion-mnist", description="a data set of pcl_ray.data.DATA_SOURCES")
    root: str | None = None
    subset: int | None = Field(None, gt=0, description="use the first N training images")
    test_subset: int | None = Field(None, gt=0, description="use the first N test images")
    image_size: int | None = Field(None, gt=0, description="None = native size")
    download: bool = False
    image_column: str = "image"
    label_column: str = "label"
    skip_bad_images: bool = Field(False, description="an image that fails to decode during training is replaced "
                                  "by the next one that decodes (one warning per file) instead of stopping the run")
    views: ViewConfig = ViewConfig()

    @field_validator("name")
    @classmethod
    def _known_data_set(cls, name: str) -> str:
        from .data import DATA_SOURCES

        return _registered(name, DATA_SOURCES)


class ModelConfig(_Section):
    backbone: Literal["convnet", "resnet18", "resnet50"] = "convnet"
    stem: Literal["small", "imagenet"] = Field(
        "small", description="ResNet stem: 3x3 stride-1 conv, no max-pool (small images) or the 7x7/2 + max-pool one")
    width: int = Field(32, gt=0, description="base channel width of the convnet backbone")
    feature_dim: int = Field(128, gt=0)
    mlp_head: bool = True
    head_bn: bool | None = Field(None, description="BatchNorm after the MLP head's hidden layer (Linear-BN-ReLU-"
                                 "Linear); None = the method's reference (HEAD_BN_METHODS: swav, deepcluster)")


class SwAVConfig(_Section):
    num_prototypes: int = Field(100, gt=1, description="paper: 3000 on ImageNet")
    epsilon: float = Field(0.05, gt=0.0, description="Sinkhorn entropic regularization")
    sinkhorn_iterations: int = Field(3, gt=0)
    freeze_prototypes_iters: int = Field(200, ge=0, description="prototype gradients zeroed for the first N steps")
    queue_length: int = Field(0, ge=0, description="0 = no queue")
    queue_start_epoch: int = Field(2, ge=0)
    num_small_crops: int = Field(2, ge=0, description="multi-crop: extra low-resolution views")
    small_crop_size: int = Field(16, gt=0)
    small_crop_scale: tuple[float, float] = (0.1, 0.4)
    large_crop_min_scale: float = Field(0.3, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _check_scale(self) -> "SwAVConfig":
        lo, hi = self.small_crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"small_crop_scale: expected [MIN, MAX] with 0 < MIN <= MAX <= 1, got [{lo}, {hi}]")
        return self


class SPCLConfig(_Section):
    ntxent_temperature: float = Field(0.5, gt=0.0)
    weight_ntxent: float = Field(1.0, ge=0.0)
    weight_metric: float = Field(1.0, ge=0.0)
    weight_proto: float = Field(1.0, ge=0.0)
    symmetric_ce: bool = False
    sce_alpha: float = Field(0.1, ge=0.0, description="weight of CE in symmetric CE")
    sce_beta: float = Field(1.0, ge=0.0, description="weight of reverse CE in symmetric CE")
    metric_pairs: int = Field(256, gt=0, description="balanced same/different-cluster pairs per batch")
    variant: Literal["full", "lite"] = Field(
        "full", description="full: the reference's losses and E-step (six-term metric loss, a fresh linear classifier "
        "on backbone features each epoch, k-means on PCA-whitened backbone features, a new seed each epoch); lite: "
        "the earlier lighter variant (cross-image metric pairs only, CE against the frozen centroids, k-means on the "
        "head); README, \"Methods\"")
    pca_dim: int | None = Field(256, gt=0, description="full variant: PCA-whiten the backbone features to "
                                "min(d, pca_dim) before k-means (None = no PCA)")


#: τ when ``method.temperature`` is not given: MoCo v2 / PCL / SimCLR-style 0.2, SwAV's and DeepCluster-v2's 0.1
DEFAULT_TEMPERATURE = 0.2
METHOD_TEMPERATURES = {"swav": 0.1, "deepcluster": 0.1}
#: methods whose reference projection head is Linear-BN-ReLU-Linear (``model.head_bn`` when not given)
HEAD_BN_METHODS = ("swav", "deepcluster")


class MethodConfig(_Section):
    name: str = Field("pcl", description="a method of pcl_ray.methods.METHODS")
    temperature: float = Field(0.2, gt=0.0, description="τ; when not given, the method's own default "
                               "(METHOD_TEMPERATURES: 0.1 for swav and deepcluster, else 0.2)")
    queue_size: int = Field(4096, ge=0)
    momentum: float = Field(0.999, ge=0.0, lt=1.0)
    num_negative_prototypes: int = Field(1024, ge=0, description="r: negatives per granularity (sampled form)")
    proto_weight: float = Field(1.0, ge=0.0)
    proto_form: Literal["auto", "sampled", "full"] = "auto"
    fixed_proto_temperature: bool = Field(
        False, description="PCL ablation: every prototype uses method.temperature instead of its φ")
    swav: SwAVConfig = SwAVConfig()
    spcl: SPCLConfig = SPCLConfig()

    @field_validator("name")
    @classmethod
    def _known_method(cls, name: str) -> str:
        from .methods import METHODS

        return _registered(name, METHODS)

    @model_validator(mode="before")
    @classmethod
    def _method_temperature(cls, data: Any) -> Any:
        """``temperature`` missing (or null) resolves to the method's default, so the logged value is the one used."""
        if isinstance(data, dict) and data.get("temperature") is None:
            name = data.get("name", cls.model_fields["name"].default)
            data = {**data, "temperature": METHOD_TEMPERATURES.get(name, DEFAULT_TEMPERATURE)}
        return data


class EStepConfig(_Section):
    num_clusters: list[int] = Field(default_factory=lambda: [10, 20, 40], min_length=1)
    niter: int = Field(20, gt=0)
    nredo: int = Field(5, gt=0)
    max_points_per_centroid: int = Field(1000, gt=0)
    alpha: float = Field(10.0, gt=0.0)
    backend: Literal["auto", "cpu", "gpu"] = "auto"
    gpu_share: float | None = Field(
        0.25, gt=0.0, lt=1.0, description="when GPU workers hold every GPU, the cluster actor asks this fraction "
        "of one GPU (each worker then asks 1 - gpu_share) and k-means runs on faiss-gpu there; None = no sharing "
        "(faiss-cpu when no GPU is spare). README \"Scale benchmark\"")
    num_threads: int | None = Field(None, gt=0, description="faiss threads; None = all CPUs of the node")
    seed: int = 0
    handoff_timeout_s: float = Field(1800.0, gt=0.0, description="longest a rank waits for an epoch's "
                                     "prototypes before the run fails with what was missing")
    handoff_grace_s: float = Field(60.0, gt=0.0, description="after a cluster-actor restart, how long a rank "
                                   "waits for the other ranks' shards before taking the prototypes from a rank "
                                   "that has them (keep well below gloo's 30-minute timeout)")
    features: Literal["eval_pass", "stream"] = Field(
        "eval_pass", description="what the E-step clusters: 'eval_pass' embeds the training set in eval mode at "
        "each E-step (the paper); 'stream' reuses the embeddings the M-step computed during the previous epoch "
        "(momentum keys for PCL), so the extra pass is skipped and the features are up to one epoch stale")
    warm_start: bool = Field(False, description="start each epoch's k-means from the previous epoch's "
                             "centroids (one restart, estep.warm_niter iterations) instead of nredo random "
                             "starts; off = the paper's E-step")
    warm_niter: int = Field(5, gt=0, description="k-means iterations of a warm-started E-step (estep.warm_start)")

    @model_validator(mode="after")
    def _check_clusters(self) -> "EStepConfig":
        bad = [k for k in self.num_clusters if k < 2]
        if bad:
            raise ValueError(f"every granularity must be >= 2, got {bad}")
        return self


class TrainConfig(_Section):
    epochs: int = Field(10, gt=0)
    warmup_epochs: int = Field(1, ge=0)
    batch_size: int = Field(256, gt=0, description="global batch, split across workers")
    lr: float = Field(0.06, gt=0.0)
    sgd_momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    schedule: Literal["cosine", "step"] = "cosine"
    lr_steps: list[int] = Field(default_factory=lambda: [120, 160])
    seed: int = 0
    log_every: int = Field(50, gt=0, description="progress line every N steps")
    keep_checkpoints: int = Field(2, gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="the forward pass's precision: auto = bf16 on GPU, fp32 on CPU; fp16 (with a grad "
                            "scaler) needs a GPU")
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="torch.compile the encoders (in place; state_dict keys unchanged): auto = off (on "
        "this CPU the warm-up, 36-134 s, outweighs a ~1.1x step; README 'Benchmarks')")
    channels_last: bool | None = Field(
        None, description="model and views in channels_last memory format: None = on (CPU and GPU; on this CPU the "
                          "convnet step runs 1.38x faster on 2 threads, 1.27x on 1; README 'Benchmarks'); false "
                          "keeps torch's default layout")
    sgd_foreach: bool | None = Field(None, description="SGD's multi-tensor (foreach) update: None = torch's "
                                     "default (on for CUDA tensors, off on CPU)")

    @model_validator(mode="after")
    def _check_steps(self) -> "TrainConfig":
        if any(e <= 0 for e in self.lr_steps) or list(self.lr_steps) != sorted(set(self.lr_steps)):
            raise ValueError(f"lr_steps: expected increasing epochs >= 1, got {self.lr_steps}")
        return self


class RayConfig(_Section):
    address: str | None = Field(
        None, description="None = attach when RAY_ADDRESS is set (inside `ray job submit`), else start a local "
                          "Ray; 'auto', HOST:PORT or ray://HOST:PORT to attach")
    connect_timeout_s: float = Field(30.0, gt=0.0, description="how long to try reaching ray.address")
    num_workers: int = Field(2, gt=0, description="Train workers; [MIN, MAX] for an elastic group (then this "
                                                  "holds MAX and ray.min_workers MIN)")
    min_workers: int | None = Field(None, gt=0, description="elastic groups: train on as few as this many workers "
                                                            "(None = exactly ray.num_workers)")
    use_gpu: Literal["auto", True, False] = "auto"
    cpus_per_worker: float = Field(1.0, gt=0.0)
    actor_cpus: float = Field(0.0, ge=0.0, description="logical CPUs reserved for the cluster actor")
    storage_path: str | None = Field(
        None, description="where runs persist: a local folder, file:///shared/mount, s3://bucket/prefix or "
                          "gs://bucket/prefix (None = <project>/runs); a multi-node cluster needs a URI")
    storage_endpoint: str | None = Field(
        None, description="S3 endpoint override for S3-compatible stores, e.g. http://10.0.0.1:9000 "
                          "(None = AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS)")
    run_name: str | None = None
    max_failures: int | None = Field(
        None, ge=0, description="Train worker-group restarts from the last checkpoint; None = 0 on a local Ray, "
                                "3 when attached to a cluster (preemptions, lost nodes)")
    object_store_memory_mb: int | None = Field(None, gt=0, description="local Ray only")

    @model_validator(mode="before")
    @classmethod
    def _elastic_range(cls, data: Any) -> Any:
        """``num_workers: [MIN, MAX]`` is stored as ``num_workers = MAX``, ``min_workers = MIN``."""
        if isinstance(data, dict) and isinstance(data.get("num_workers"), (list, tuple)):
            pair = list(data["num_workers"])
            if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
                raise ValueError(f"num_workers: expected an int or [MIN, MAX] of two ints, got {pair!r}")
            if not 1 <= pair[0] <= pair[1]:
                raise ValueError(f"num_workers: [MIN, MAX] needs 1 <= MIN <= MAX, got {pair!r}")
            data = {**data, "num_workers": pair[1], "min_workers": pair[0]}
        return data

    @model_validator(mode="after")
    def _check_min(self) -> "RayConfig":
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(f"min_workers ({self.min_workers}) must be <= num_workers ({self.num_workers})")
        return self

    @property
    def worker_counts(self) -> range:
        """Every world size the run may train at."""
        return range(self.min_workers or self.num_workers, self.num_workers + 1)

    @property
    def scaling_workers(self) -> int | tuple[int, int]:
        """``ScalingConfig(num_workers=...)``: an int, or ``(min, max)`` for an elastic group."""
        if self.min_workers is None or self.min_workers == self.num_workers:
            return self.num_workers
        return (self.min_workers, self.num_workers)


class TrackingConfig(_Section):
    uri: str | None = Field(None, description="None = sqlite store under <project>/mlruns")
    experiment: str = "pcl-ray"
    run_name: str | None = None


EVAL_SUITES = ("knn", "linear", "lowshot", "finetune", "cluster", "tsne", "export")
EVAL_FEATURES = ("backbone", "head")  # pooled backbone output; the projection head's normalized output


class EvalConfig(_Section):
    enabled: bool = True
    knn_k: int = Field(200, gt=0)
    knn_temperature: float = Field(0.1, gt=0.0)
    knn_extra_k: list[int] = Field(
        default_factory=lambda: [20],
        description="further neighbour counts, each reported as knn<k>_acc beside knn_acc (k = knn_k); "
                    "20 is DINO's protocol, 200 (knn_k) InstDisc's and MoCo's")
    kmeans_restarts: int = Field(5, gt=0)
    feature: Literal[EVAL_FEATURES] = "backbone"  # type: ignore[valid-type]
    baselines: bool = True
    # cheap per-epoch kNN on held TRAIN images (never the test split): what sweeps optimize
    online_every: int = Field(1, ge=0, description="epochs between online kNN checks; 0 = off")
    online_bank: int = Field(5000, gt=0, description="training images in the kNN bank (seeded, class-stratified)")
    online_queries: int = Field(1000, gt=0, description="other training images used as queries (seeded, stratified)")
    # `run.py eval` suite (pcl_ray.evaluation.suite); `--suite` on the command line overrides `suites`.
    suites: list[Literal[EVAL_SUITES]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: [s for s in EVAL_SUITES if s != "finetune"], min_length=1,
        description="suites `run.py eval` runs by default (finetune is expensive on CPU)")
    linear_weight_decays: list[float] = Field(
        default_factory=lambda: [1e-6, 1e-5, 1e-4, 1e-3, 1e-2], min_length=1,
        description="L2 penalties tried by the linear probe, chosen on a validation split of train")
    linear_val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    linear_max_iter: int = Field(100, gt=0, description="L-BFGS iterations per fit")
    lowshot_shots: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16], min_length=1)
    lowshot_draws: int = Field(5, gt=0, description="random draws of the labelled images per shot")
    lowshot_costs: list[float] = Field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0, 100.0], min_length=1)
    lowshot_val_per_class: int = Field(20, gt=0, description="validation images per class for choosing C "
                                                             "(drawn from the remaining train images)")
    finetune_fractions: list[float] = Field(default_factory=lambda: [0.01, 0.1], min_length=1)
    finetune_epochs: int = Field(10, gt=0)
    finetune_batch_size: int = Field(128, gt=1)
    finetune_lr: float = Field(0.01, gt=0.0, description="backbone learning rate")
    finetune_classifier_lr: float = Field(0.1, gt=0.0)
    tsne_points: int = Field(3000, gt=1, description="test points in the t-SNE picture (seeded subsample)")
    export_splits: list[Literal["train", "test"]] = Field(default_factory=lambda: ["train", "test"], min_length=1)

    @model_validator(mode="after")
    def _check_eval_grids(self) -> "EvalConfig":
        if any(k < 1 for k in self.knn_extra_k):
            raise ValueError(f"knn_extra_k must all be >= 1, got {self.knn_extra_k}")
        if any(k < 1 for k in self.lowshot_shots):
            raise ValueError(f"lowshot_shots must all be >= 1, got {self.lowshot_shots}")
        if any(c <= 0 for c in self.lowshot_costs) or any(w < 0 for w in self.linear_weight_decays):
            raise ValueError("lowshot_costs must be > 0 and linear_weight_decays >= 0")
        if any(not 0.0 < f <= 1.0 for f in self.finetune_fractions):
            raise ValueError(f"finetune_fractions must lie in (0, 1], got {self.finetune_fractions}")
        return self


class ExperimentConfig(_Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    method: MethodConfig = MethodConfig()
    estep: EStepConfig = EStepConfig()
    train: TrainConfig = TrainConfig()
    ray: RayConfig = RayConfig()
    tracking: TrackingConfig = TrackingConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="before")
    @classmethod
    def _method_head(cls, data: Any) -> Any:
        """``model.head_bn`` missing (or null) resolves to the method's reference head, so the logged value is used."""
        if not isinstance(data, dict):
            return data
        model, method = data.get("model", {}), data.get("method", {})
        if isinstance(model, dict) and model.get("head_bn") is None:
            name = method.get("name", "pcl") if isinstance(method, dict) else getattr(method, "name", "pcl")
            data = {**data, "model": {**model, "head_bn": name in HEAD_BN_METHODS}}
        return data

    @model_validator(mode="after")
    def _cross_checks(self) -> "ExperimentConfig":
        if self.train.warmup_epochs > self.train.epochs:
            raise ValueError(
                f"train.warmup_epochs ({self.train.warmup_epochs}) must be <= train.epochs ({self.train.epochs})"
            )
        uneven = [w for w in self.ray.worker_counts if self.train.batch_size % w]
        if uneven:
            counts = (f"every worker count in [{self.ray.min_workers}, {self.ray.num_workers}]"
                      if len(self.ray.worker_counts) > 1 else f"ray.num_workers ({self.ray.num_workers})")
            raise ValueError(
                f"train.batch_size ({self.train.batch_size}) must be divisible by {counts}, so that the global "
                f"batch stays exact on any world size; it is not by {uneven}")
        if self.method.name == "deepcluster" and self.train.warmup_epochs != 0:
            raise ValueError(
                f"train.warmup_epochs must be 0 for method.name=deepcluster (got {self.train.warmup_epochs}): "
                "it trains only on k-means pseudo-labels, clustered from the first epoch as in the reference"
            )
        if self.estep.warm_start and self.method.name in ("deepcluster", "spcl"):
            raise ValueError(
                f"estep.warm_start must be false for method.name={self.method.name}: its reference draws a new "
                "k-means seed every epoch (a warm start from last epoch's centroids would replace it)")
        return self

    @property
    def needs_estep(self) -> bool:
        from .methods import METHODS as registry

        return registry[self.method.name].needs_estep

    def public_dict(self) -> dict[str, Any]:
        """The resolved config as plain data with passwords masked: what is logged, saved and shown."""
        from .secrets import redact_config

        return redact_config(self.model_dump(mode="json"))

    def flat(self) -> dict[str, Any]:
        """Dotted-key view of the resolved config (for MLflow params), passwords masked."""
        return dict(_flatten(self.public_dict()))


def _flatten(d: dict[str, Any], prefix: str = ""):
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flatten(value, name + ".")
        else:
            yield name, value


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "value_error":  # our own validators: the message names what and why already
            msg = msg.removeprefix("Value error, ")
            head = re.match(r"^([a-z_]+): ", msg)
            if head and key != "<root>":  # "ray" + "num_workers: ..." -> "ray.num_workers: ..."
                key, msg = f"{key}.{head.group(1)}", msg[head.end():]
            elif key == "<root>":
                lines.append(f"  {msg}")
                continue
        elif "input" in e and e["type"] not in ("missing",):
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.epochs=3")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: empty key segment in {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {exc}") from None
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for i, part in enumerate(path[:-1]):
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"{'.'.join(path[: i + 1])}: is a value, not a section")
            node = nxt
        node[path[-1]] = value
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that repeats a key (plain YAML keeps the last one silently)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A pipeline file's mapping; ``path`` is a path or a shipped pipeline's name (``digits_tiny``)."""
    from .paths import resolve_pipeline, shipped_pipelines

    p = resolve_pipeline(path)
    if not p.is_file():
        raise ConfigError(f"pipeline file not found: {p} (a path, or a shipped pipeline: "
                          f"{', '.join(shipped_pipelines())})")
    try:
        data = yaml.load(p.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark is not None else ""
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{p}: not valid YAML:{where} {what}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def build_config(raw: dict[str, Any], source: str = "config") -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load a pipeline YAML (or the defaults when ``path`` is None) and apply dotted overrides."""
    raw = load_yaml(path) if path is not None else {}
    # Sections that are not config (e.g. a pipeline's `tune:` block) are handled by their verbs.
    raw = {k: v for k, v in raw.items() if k not in ("tune", "compare")}
    raw = apply_overrides(raw, overrides or [])
    source = str(path) if path else "defaults"
    if overrides:
        source += " + --set " + " ".join(overrides)
    return build_config(raw, source)


def dump_config(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML, passwords masked (``--print-config``, the config.yaml artifact)."""
    return yaml.safe_dump(cfg.public_dict(), sort_keys=False)
