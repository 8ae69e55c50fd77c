"""Bad input through the command line: every case stops before anything starts.

Each case of the table runs ``pcl_ray.cli.main([...])`` in this process (a few run ``python run.py``
as subprocesses, all at once) and checks: exit code 2, exactly one line on stderr, ``error: ...``
naming the key or the file, no traceback, Ray not started, no MLflow run and no file left in the
case's storage folder (``ray.storage_path`` and ``tracking.uri`` point into the case's tmp folder).

The end of the file checks the one thing that cannot be caught up front, an image that breaks in the
middle of an epoch: the error names the file, also through a DataLoader worker and a Ray Train worker
failure, and ``data.skip_bad_images`` replaces it.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import socket
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from pcl_ray import cli

PROJECT = Path(__file__).resolve().parent.parent
TINY = PROJECT / "pipelines" / "digits_tiny.yaml"
TUNE_TINY = PROJECT / "pipelines" / "tune_digits_smoke.yaml"


# ----------------------------------------------------------------------------- bad data on disk


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _fmnist(root: Path, n: int = 40) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return root


def _imagefolder(root: Path, splits=("train", "val"), classes=("cat", "dog"), per_class: int = 6) -> Path:
    rng = np.random.default_rng(1)
    for split in splits:
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                (d / f"{c}{i:02d}.png").write_bytes(_png(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)))
    return root


def _parquet(path: Path, blobs: list, labels: list | None, *, image_type=None, label_type=None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {"image": pa.array(blobs, type=image_type or pa.binary())}
    if labels is not None:
        columns["label"] = pa.array(labels, type=label_type or pa.int64())
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def _pngs(n: int, size: int = 10) -> list[bytes]:
    rng = np.random.default_rng(2)
    return [_png(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> dict[str, Path]:
    """One folder (or file) per kind of bad data set."""
    base = tmp_path_factory.mktemp("bad-data")
    out: dict[str, Path] = {}

    magic = _fmnist(base / "fmnist-magic")
    (magic / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x01\x02\x08\x03" + bytes(64)))
    out["fmnist_magic"] = magic
    cut = _fmnist(base / "fmnist-truncated")
    raw = (cut / "train-images-idx3-ubyte.gz").read_bytes()
    (cut / "train-images-idx3-ubyte.gz").write_bytes(raw[: len(raw) // 2])
    out["fmnist_truncated"] = cut
    notgz = _fmnist(base / "fmnist-notgz")
    (notgz / "train-labels-idx1-ubyte.gz").write_bytes(b"this is not gzip data at all")
    out["fmnist_notgz"] = notgz
    short = _fmnist(base / "fmnist-short")
    _write_idx(short / "train-labels-idx1-ubyte.gz", np.arange(7) % 10)  # 40 images, 7 labels
    out["fmnist_mismatch"] = short

    out["if_no_train"] = _imagefolder(base / "if-no-train", splits=("val",))
    out["if_no_val"] = _imagefolder(base / "if-no-val", splits=("train",))
    empty = _imagefolder(base / "if-empty-train", splits=("val",))
    (empty / "train").mkdir()
    out["if_empty_train"] = empty
    noimg = _imagefolder(base / "if-empty-class", splits=("val",))
    (noimg / "train" / "cat").mkdir(parents=True)
    out["if_class_without_images"] = noimg
    corrupt = _imagefolder(base / "if-corrupt")
    (corrupt / "train" / "dog" / "dog03.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    out["if_corrupt"] = corrupt
    out["if_one_class"] = _imagefolder(base / "if-one-class", classes=("cat",), per_class=12)

    pq_dir = base / "pq"
    out["pq_corrupt"] = pq_dir / "corrupt"
    (pq_dir / "corrupt").mkdir(parents=True)
    (pq_dir / "corrupt" / "train-0.parquet").write_bytes(b"PAR1 but not really a parquet file")
    blobs = _pngs(8)
    _parquet(pq_dir / "null" / "train-0.parquet", blobs[:3] + [None] + blobs[4:], [0, 1] * 4)
    out["pq_null"] = pq_dir / "null"
    import pyarrow as pa

    _parquet(pq_dir / "string" / "train-0.parquet", ["a.png"] * 8, [0, 1] * 4, image_type=pa.string())
    out["pq_string"] = pq_dir / "string"
    _parquet(pq_dir / "undecodable" / "train-0.parquet", blobs[:5] + [b"not an image"] + blobs[6:], [0, 1] * 4)
    out["pq_undecodable"] = pq_dir / "undecodable"
    _parquet(pq_dir / "strlabel" / "train-0.parquet", blobs, ["cat", "dog"] * 4, label_type=pa.string())
    out["pq_label_type"] = pq_dir / "strlabel"
    _parquet(pq_dir / "nolabels" / "train-0.parquet", blobs, [0, 1] * 4)
    _parquet(pq_dir / "nolabels" / "test-0.parquet", blobs[:4], None)
    out["pq_test_unlabelled"] = pq_dir / "nolabels"
    _parquet(pq_dir / "notest" / "train-0.parquet", blobs, [0, 1] * 4)
    out["pq_no_test"] = pq_dir / "notest"
    _parquet(pq_dir / "oneclass" / "train-0.parquet", blobs, [3] * 8)
    _parquet(pq_dir / "oneclass" / "test-0.parquet", blobs[:4], [3] * 4)
    out["pq_one_class"] = pq_dir / "oneclass"

    yml = base / "yaml"
    yml.mkdir()
    (yml / "dup.yaml").write_text("data: {name: digits}\ntrain:\n  epochs: 2\n  lr: 0.1\n  epochs: 3\n")
    (yml / "broken.yaml").write_text("train: {epochs: 2\nray: [\n")
    (yml / "list.yaml").write_text("- train\n- ray\n")
    tune_base = TUNE_TINY.read_text().split("tune:")[0]
    for name, space in {
        "tune_bad_value": "train.lr: {choice: [0.1, -1.0]}",
        "tune_unknown_key": "train.learning_rate: {grid: [0.1, 0.2]}",
        "tune_inverted": "train.lr: {loguniform: [0.3, 0.01]}",
        "tune_k_too_big": "estep.num_clusters: {choice: [[10], [10, 5000]]}",
        "tune_routing_key": "ray.storage_path: {choice: [/tmp/a, /tmp/b]}",
        "tune_bad_dist": "train.lr: {normal: [0.1, 0.01]}",
    }.items():
        (yml / f"{name}.yaml").write_text(tune_base + f"tune:\n  search_space:\n    {space}\n"
                                          "  metric: online/knn_acc\n  mode: max\n")
    compare = "compare:\n  name: {name}\n  seeds: [0]\n  entries:\n{entries}"
    entry = "    - {{label: {label}, pipeline: {pipe}, set: [{set}]}}\n"
    for name, entries in {
        "cmp_bad_label": [("../up", ""), ("b", "")],
        "cmp_dup_label": [("a", ""), ("a", "method.name=moco")],
        "cmp_differ": [("a", ""), ("b", "train.batch_size=64")],
        "cmp_bad_key": [("a", ""), ("b", "method.nme=moco")],
        "cmp_one_entry": [("a", "")],
    }.items():
        body = "".join(entry.format(label=lab, pipe=TINY, set=s) for lab, s in entries)
        (yml / f"{name}.yaml").write_text(compare.format(name="cmp", entries=body))
    (yml / "cmp_no_section.yaml").write_text(TINY.read_text())
    out["yaml"] = yml
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----------------------------------------------------------------------------- the table


@dataclass
class Case:
    """``argv`` for ``run.py``; ``{placeholders}`` filled per case. ``expect``: text the message must hold."""

    id: str
    argv: list[str]
    expect: list[str]
    pending: str | None = None  # why the product does not catch it yet (strict xfail)


def T(*sets: str, pipeline: str = str(TINY)) -> list[str]:
    return ["train", pipeline, *[a for s in sets for a in ("--set", s)]]


Y = "{yaml}"
BUCKET_AFTER_RAY = ("workflow.connect checks the bucket (storage.check_writable) only after init_ray has started Ray; "
                    "call storage.check_writable() before init_ray")
TUNE_NO_DATA_CHECK = ("sweep validate_space builds each edge value's config but never checks it against the data "
                      "(k < N, batch <= N): call workflow.preflight(cfg, N) per edge value, N from load_split once")
NEEDS_CHECK_DATA = ("workflow.train loads only the training split before it starts; it must call "
                    "pcl_ray.data.check_data(cfg) instead of load_split(cfg.data, 'train')")

CASES: list[Case] = [
    # --- config keys and values
    Case("unknown-key", T("train.epoch=3"), ["train.epoch", "unknown key"]),
    Case("unknown-section", T("optim.lr=0.1"), ["optim", "unknown key"]),
    Case("bad-type-int", T("train.epochs=abc"), ["train.epochs"]),
    Case("bad-type-list", T("train.batch_size=[1,2]"), ["train.batch_size"]),
    Case("bad-type-bool", T("eval.enabled=maybe"), ["eval.enabled"]),
    Case("out-of-range-lr", T("train.lr=-1"), ["train.lr", "greater than 0"]),
    Case("out-of-range-momentum", T("method.momentum=1.5"), ["method.momentum"]),
    Case("out-of-range-timeout", T("ray.connect_timeout_s=0"), ["ray.connect_timeout_s"]),
    Case("bad-literal-method", T("method.name=byol"), ["method.name"]),
    Case("bad-literal-data", T("data.name=mnist"), ["data.name"]),
    Case("inverted-range", T("method.swav.small_crop_scale=[0.9,0.1]"), ["small_crop_scale"]),
    Case("lr-steps-negative", T("train.lr_steps=[-5,10]"), ["train.lr_steps"]),
    Case("lr-steps-unsorted", T("train.lr_steps=[160,120]"), ["train.lr_steps"]),
    Case("k-below-2", T("estep.num_clusters=[1,10]"), ["estep.num_clusters"]),
    Case("gpu-share-one", T("estep.gpu_share=1"), ["estep.gpu_share", "less than 1"]),
    Case("gpu-share-zero", T("estep.gpu_share=0"), ["estep.gpu_share", "greater than 0"]),
    Case("eval-shots-zero", T("eval.lowshot_shots=[0,1]"), ["eval.lowshot_shots"]),
    Case("warmup-over-epochs", T("train.warmup_epochs=5"), ["train.warmup_epochs"]),
    Case("override-no-equals", T("train.epochs"), ["train.epochs", "KEY=VALUE"]),
    Case("override-into-value", T("train.epochs.max=3"), ["train.epochs"]),
    Case("override-bad-yaml", T("estep.num_clusters=[10,"), ["estep.num_clusters"]),
    # --- pipeline files
    Case("yaml-duplicate-key", ["train", f"{Y}/dup.yaml"], ["dup.yaml", "duplicate key 'epochs'"]),
    Case("yaml-syntax", ["train", f"{Y}/broken.yaml"], ["broken.yaml", "not valid YAML"]),
    Case("yaml-not-mapping", ["train", f"{Y}/list.yaml"], ["list.yaml", "mapping"]),
    Case("pipeline-missing", ["train", f"{Y}/nope.yaml"], ["nope.yaml", "not found"]),
    # --- workers, batch, k against the data
    Case("workers-not-dividing", T("train.batch_size=256", "ray.num_workers=3"), ["ray.num_workers", "256"]),
    Case("workers-inverted-range", T("ray.num_workers=[3,1]"), ["ray.num_workers"]),
    Case("workers-range-uneven", T("ray.num_workers=[1,3]"), ["train.batch_size"]),
    Case("k-at-least-n", T("estep.num_clusters=[10,1500]"), ["estep.num_clusters", "1500"]),
    Case("batch-over-n", T("data.subset=100", "ray.num_workers=1"), ["train.batch_size", "100"]),
    # --- names and resume
    Case("run-name-traversal", T("ray.run_name=../../x"), ["ray.run_name", "safe name"]),
    Case("run-name-slash", T("ray.run_name=a/b"), ["ray.run_name"]),
    Case("resume-missing", [*T(), "--resume", "no-such-run"], ["--resume", "no-such-run"]),
    Case("resume-latest-none", [*T(), "--resume"], ["--resume", "digits_tiny"]),
    Case("resume-unsafe", [*T(), "--resume", "../x"], ["--resume"]),
    # --- cluster, tracking, storage
    Case("ray-address-unreachable", T("ray.address=127.0.0.1:{port}", "ray.connect_timeout_s=2"),
         ["ray.address", "127.0.0.1:{port}"]),
    Case("ray-address-bad-port", T("ray.address=127.0.0.1:notaport"), ["ray.address"]),
    Case("tracking-server-down", T("tracking.uri=http://127.0.0.1:{port}"), ["tracking.uri", "127.0.0.1:{port}"]),
    Case("tracking-bogus-scheme", T("tracking.uri=bogus://where"), ["tracking.uri", "scheme"]),
    Case("tracking-corrupt-sqlite", T("tracking.uri=sqlite:///{tmp}/corrupt.db"), ["tracking.uri", "corrupt.db"]),
    Case("tracking-sqlite-relative", T("tracking.uri=sqlite://relative.db"), ["tracking.uri"]),
    Case("tracking-password-hidden", T("tracking.uri=http://user:s3cret@127.0.0.1:{port}"), ["tracking.uri"]),
    Case("storage-ftp", T("ray.storage_path=ftp://x/runs"), ["ray.storage_path", "ftp"]),
    Case("storage-s3-no-bucket", T("ray.storage_path=s3://no-such-bucket-pcl/runs", "ray.storage_endpoint={s3}"),
         ["ray.storage_path", "no-such-bucket-pcl"]),
    Case("storage-s3-bucket-missing", T("ray.storage_path=s3:///runs"), ["ray.storage_path", "bucket"]),
    # --- data sets (item 1)
    Case("fmnist-bad-magic", T("data.name=fashion-mnist", "data.root={fmnist_magic}"),
         ["train-images-idx3-ubyte.gz", "magic"]),
    Case("fmnist-truncated-gz", T("data.name=fashion-mnist", "data.root={fmnist_truncated}"),
         ["train-images-idx3-ubyte.gz", "truncated"]),
    Case("fmnist-not-gzip", T("data.name=fashion-mnist", "data.root={fmnist_notgz}"),
         ["train-labels-idx1-ubyte.gz"]),
    Case("fmnist-count-mismatch", T("data.name=fashion-mnist", "data.root={fmnist_mismatch}"), ["disagree"]),
    Case("fmnist-missing-dir", T("data.name=fashion-mnist", "data.root={tmp}/nowhere"), ["data.root", "nowhere"]),
    Case("imagefolder-no-root", T("data.name=imagefolder"), ["data.root", "imagefolder"]),
    Case("imagefolder-root-missing", T("data.name=imagefolder", "data.root={tmp}/nowhere"), ["data.root", "nowhere"]),
    Case("imagefolder-no-train", T("data.name=imagefolder", "data.root={if_no_train}"), ["data.root", "train/"]),
    Case("imagefolder-empty-train", T("data.name=imagefolder", "data.root={if_empty_train}"),
         ["data.root", "if-empty-train/train"]),
    Case("imagefolder-class-no-images", T("data.name=imagefolder", "data.root={if_class_without_images}"),
         ["data.root", "no images"]),
    Case("imagefolder-corrupt-image", T("data.name=imagefolder", "data.root={if_corrupt}"),
         ["dog03.png", "cannot decode"]),
    Case("imagefolder-no-val", T("data.name=imagefolder", "data.root={if_no_val}", "data.image_size=8",
                                 "data.subset=12", "train.batch_size=4", "estep.num_clusters=[2]"),
         ["data.root", "val/"]),
    Case("imagefolder-one-class", T("data.name=imagefolder", "data.root={if_one_class}", "data.image_size=8",
                                    "train.batch_size=4", "estep.num_clusters=[2]"),
         ["data.label_column", "at least 2"]),
    Case("parquet-no-root", T("data.name=parquet"), ["data.root", "parquet"]),
    Case("parquet-corrupt-file", T("data.name=parquet", "data.root={pq_corrupt}"),
         ["train-0.parquet", "not a readable Parquet file"]),
    Case("parquet-null-bytes", T("data.name=parquet", "data.root={pq_null}"), ["data.image_column", "row 3"]),
    Case("parquet-string-column", T("data.name=parquet", "data.root={pq_string}"), ["data.image_column", "string"]),
    Case("parquet-undecodable", T("data.name=parquet", "data.root={pq_undecodable}"),
         ["train-0.parquet row 5", "cannot decode"]),
    Case("parquet-missing-column", T("data.name=parquet", "data.root={pq_null}", "data.image_column=img"),
         ["data.image_column", "img"]),
    Case("parquet-label-type", T("data.name=parquet", "data.root={pq_label_type}"), ["data.label_column"]),
    Case("parquet-test-unlabelled", T("data.name=parquet", "data.root={pq_test_unlabelled}", "train.batch_size=4",
                                      "estep.num_clusters=[2]"),
         ["data.label_column", "no labels"]),
    Case("parquet-no-test-split", T("data.name=parquet", "data.root={pq_no_test}", "train.batch_size=4",
                                    "estep.num_clusters=[2]"),
         ["data.root", "test"]),
    Case("parquet-one-class", T("data.name=parquet", "data.root={pq_one_class}", "train.batch_size=4",
                                "estep.num_clusters=[2]"),
         ["data.label_column", "at least 2"]),
    # --- eval verb
    Case("eval-no-such-run", ["eval", "no-such-run-xyz"], ["no-such-run-xyz"]),
    Case("eval-bad-suite", ["eval", "no-such-run-xyz", "--suite", "knn,bogus"], ["bogus"]),
    Case("eval-missing-file", ["eval", "{tmp}/nope/final_state.pt"], ["nope/final_state.pt"]),
    Case("eval-corrupt-checkpoint", ["eval", "{tmp}/junk.pt"], ["junk.pt", "not a readable torch checkpoint"]),
    Case("eval-run-without-checkpoint", ["eval", "broken-run"], ["broken-run", "no readable checkpoint"]),
    Case("eval-unsafe-storage", ["eval", "some-run", "--set", "ray.storage_path=ftp://x/runs"], ["ray.storage_path"]),
    # --- tune --dry-run
    Case("tune-bad-choice-value", ["tune", f"{Y}/tune_bad_value.yaml", "--dry-run"],
         ["tune.search_space", "train.lr"]),
    Case("tune-unknown-key", ["tune", f"{Y}/tune_unknown_key.yaml", "--dry-run"],
         ["tune.search_space", "train.learning_rate"]),
    Case("tune-inverted-range", ["tune", f"{Y}/tune_inverted.yaml", "--dry-run"], ["loguniform"]),
    Case("tune-k-at-least-n", ["tune", f"{Y}/tune_k_too_big.yaml", "--dry-run"],
         ["estep.num_clusters", "5000"]),
    Case("tune-routing-key", ["tune", f"{Y}/tune_routing_key.yaml", "--dry-run"], ["ray.storage_path"]),
    Case("tune-bad-distribution", ["tune", f"{Y}/tune_bad_dist.yaml", "--dry-run"], ["normal"]),
    Case("tune-unsafe-name", ["tune", str(TUNE_TINY), "--dry-run", "--name", "../x"], ["--name"]),
    Case("tune-bad-override", ["tune", str(TUNE_TINY), "--dry-run", "--set", "tune.mode=maximum"], ["tune.mode"]),
    # --- compare
    Case("compare-unsafe-label", ["compare", f"{Y}/cmp_bad_label.yaml"], ["compare.entries", "../up"]),
    Case("compare-duplicate-label", ["compare", f"{Y}/cmp_dup_label.yaml"], ["labels must be unique"]),
    Case("compare-conditions-differ", ["compare", f"{Y}/cmp_differ.yaml"], ["train.batch_size"]),
    Case("compare-bad-entry-key", ["compare", f"{Y}/cmp_bad_key.yaml"], ["method.nme"]),
    Case("compare-one-entry", ["compare", f"{Y}/cmp_one_entry.yaml"], ["compare.entries"]),
    Case("compare-no-section", ["compare", f"{Y}/cmp_no_section.yaml"], ["compare:"]),
    Case("compare-bad-data", ["compare", f"{Y}/cmp_differ.yaml", "--set", "train.batch_size=64",
                              "--set", "data.name=imagefolder"], ["data.root"]),
    Case("compare-bad-override", ["compare", f"{Y}/cmp_differ.yaml", "--set", "train.epochs=0"], ["train.epochs"]),
]

#: Cases also run as ``python run.py ...`` subprocesses (in parallel), to check the real entry point.
SUBPROCESS_IDS = ("unknown-key", "fmnist-bad-magic", "parquet-undecodable", "tracking-bogus-scheme",
                  "yaml-duplicate-key")


# ----------------------------------------------------------------------------- running one case


def _fill(text: str, values: dict[str, str]) -> str:
    for k, v in values.items():
        text = text.replace("{" + k + "}", v)
    return text


def _argv(case: Case, values: dict[str, str]) -> list[str]:
    """The case's arguments, plus storage and tracking in its tmp folder unless the case sets them itself."""
    argv = [_fill(a, values) for a in case.argv]
    given = " ".join(argv)
    for key, value in (("ray.storage_path", f"{values['tmp']}/runs"),
                       ("tracking.uri", f"sqlite:///{values['tmp']}/mlflow.db")):
        if f"{key}=" not in given:
            argv += ["--set", f"{key}={value}"]
    return argv


def _values(case: Case, tmp: Path, bad: dict[str, Path], request) -> dict[str, str]:
    values = {k: str(v) for k, v in bad.items()}
    values.update(tmp=str(tmp), port=str(_free_port()))
    if "{s3}" in " ".join(case.argv):
        endpoint, _ = request.getfixturevalue("s3_server")
        values["s3"] = endpoint
    if case.id == "tracking-corrupt-sqlite":
        (tmp / "corrupt.db").write_bytes(b"this is not a sqlite database" * 100)
    if case.id == "eval-corrupt-checkpoint":
        (tmp / "junk.pt").write_bytes(b"not a checkpoint")
    if case.id == "eval-run-without-checkpoint":  # a run folder whose only state file is garbage
        (tmp / "runs" / "broken-run").mkdir(parents=True)
        (tmp / "runs" / "broken-run" / "final_state.pt").write_bytes(b"junk")
    return values


def _left_behind(tmp: Path, before: set[str] = frozenset()) -> list[str]:
    """Files a failed start left in the case's folder: new files under runs/, MLflow runs in mlflow.db."""
    found = sorted(_files(tmp / "runs") - set(before))
    db = tmp / "mlflow.db"
    if db.exists() and db.stat().st_size:
        with sqlite3.connect(db) as con:
            tables = {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
            if "runs" in tables:
                found += [f"mlflow run {r[0]}" for r in con.execute("select run_uuid from runs")]
    return found


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} if folder.exists() else set()


def _check(case: Case, rc: int, out: str, err: str, values: dict[str, str], tmp: Path, before: set[str]) -> None:
    """Exit 2; stderr ends with the one ``error:`` line (other lines only the product's own warnings)."""
    shown = f"rc={rc}\nstderr:\n{err[-3000:]}\nstdout:\n{out[-1500:]}"
    assert "Traceback" not in err and "Traceback" not in out, shown
    assert rc == 2, shown
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), shown
    assert all(line.startswith("[pcl-ray]") for line in lines[:-1]), shown
    for want in case.expect:
        assert _fill(want, values) in lines[-1], f"{want!r} not in the message\n{shown}"
    assert "s3cret" not in err + out, "a password was printed"
    left = _left_behind(tmp, before)
    assert not left, f"left behind: {left}\n{shown}"


def _ray_started() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray is not None and getattr(ray, "is_initialized", lambda: False)())


class RayWouldStart(BaseException):
    """Raised by the guarded ``ray.init``: a case reached the point where Ray starts (a BaseException, so
    that no ``except Exception`` of the product turns it into something else)."""


def _params():
    for case in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=case.pending)] if case.pending else []
        yield pytest.param(case, id=case.id, marks=marks)


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No Ray address from the environment; ``ray.init`` refuses to run (a case that gets that far fails
    at once instead of training); MLflow's default store in the case's folder."""
    import ray

    def refuse(*args, **kwargs):
        raise RayWouldStart("ray.init was called: the bad input was not caught before Ray starts")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "raytmp"))
    monkeypatch.setenv("PCL_RAY_MLRUNS", str(tmp_path / "mlruns-default"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("case", _params())
def test_bad_input_in_process(case: Case, isolated: Path, bad, request, capsys) -> None:
    assert not _ray_started(), "an earlier test left Ray running in this process"
    values = _values(case, isolated, bad, request)
    before = _files(isolated / "runs")
    argv = _argv(case, values)
    try:
        rc = cli.main(argv)
    except SystemExit as exc:  # argparse errors
        rc = exc.code
    except RayWouldStart as exc:
        pytest.fail(f"{exc}\n{capsys.readouterr().err[-2000:]}")
    captured = capsys.readouterr()
    assert not _ray_started(), "Ray was started"
    _check(case, rc, captured.out, captured.err, values, isolated, before)


def test_bad_input_as_subprocesses(tmp_path, bad, request) -> None:
    """A few cases through ``python run.py`` itself, started together (each pays its own imports)."""
    by_id = {c.id: c for c in CASES}
    procs = []
    for cid in SUBPROCESS_IDS:
        case, tmp = by_id[cid], tmp_path / cid
        tmp.mkdir()
        values = _values(case, tmp, bad, request)
        before = _files(tmp / "runs")
        env = {**os.environ, "RAY_TMPDIR": str(tmp / "raytmp"), "PCL_RAY_MLRUNS": str(tmp / "mlruns-default")}
        env.pop("RAY_ADDRESS", None)
        cmd = [sys.executable, str(PROJECT / "run.py"), *_argv(case, values)]
        procs.append((case, tmp, values, before, subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE,
                                                          stderr=subprocess.PIPE, text=True)))
    for case, tmp, values, before, proc in procs:
        out, err = proc.communicate(timeout=120)
        _check(case, proc.returncode, out, err, values, tmp, before)
        assert not (tmp / "raytmp").exists(), f"{case.id}: Ray was started"


def test_table_size() -> None:
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)


# ----------------------------------------------------------------------------- images that break later


def _lazy_set(root: Path, n: int = 40, bad_at: int | None = None):
    """An ImageFolder of ``n`` images in one class folder per half; image ``bad_at`` (sorted order) corrupt."""
    from pcl_ray.data.checks import sample_indices

    if bad_at is None:  # the first image the load-time sample does not try
        bad_at = int(next(i for i in range(n) if i not in set(sample_indices(n).tolist())))
    rng = np.random.default_rng(3)
    paths = []
    for i in range(n):
        d = root / "train" / ("a" if i < n // 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"img{i:03d}.png"
        p.write_bytes(_png(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)))
        paths.append(p)
    paths[bad_at].write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    return paths[bad_at], bad_at


class _Data:
    def __init__(self, root: Path, **extra) -> None:
        self.name, self.root, self.image_size = "imagefolder", str(root), 8
        self.__dict__.update(extra)


def test_corrupt_image_found_mid_epoch_names_the_file(tmp_path) -> None:
    from pcl_ray.data import BadImageError, iterate_batches, load_split

    bad_file, bad_at = _lazy_set(tmp_path)
    ds = load_split(_Data(tmp_path), "train")  # the seeded sample at load does not meet it
    with pytest.raises(BadImageError) as err:
        for _ in iterate_batches(ds, None, 8, shuffle=False, seed=0, drop_last=False):
            pass
    message = str(err.value)
    assert str(bad_file) in message and "\n" not in message and "data.skip_bad_images" in message
    with pytest.raises(BadImageError) as err:  # a DataLoader worker rebuilds the error from its traceback text
        for _ in iterate_batches(ds, None, 8, shuffle=False, seed=0, drop_last=False, loader_workers=1):
            pass
    assert str(err.value) == message
    assert str(pickle.loads(pickle.dumps(err.value))) == message  # crosses from a Ray worker intact


def test_corrupt_image_in_the_sample_stops_the_load(tmp_path) -> None:
    from pcl_ray.data import BadImageError, load_split
    from pcl_ray.data.checks import sample_indices

    bad_file, _ = _lazy_set(tmp_path, bad_at=int(sample_indices(40)[3]))
    with pytest.raises(BadImageError, match="img"):
        load_split(_Data(tmp_path), "train")
    assert load_split(_Data(tmp_path, skip_bad_images=True), "train") is not None  # only a warning then


def test_skip_bad_images_replaces_the_image(tmp_path, capsys) -> None:
    from pcl_ray.data import iterate_batches, load_split

    bad_file, bad_at = _lazy_set(tmp_path)
    ds = load_split(_Data(tmp_path, skip_bad_images=True), "train")
    batches = list(iterate_batches(ds, None, 8, shuffle=False, seed=0, drop_last=False))
    images = np.concatenate([b[0].numpy() for b in batches])
    indices = np.concatenate([b[1].numpy() for b in batches])
    assert images.shape == (40, 3, 8, 8) and indices.tolist() == list(range(40))
    np.testing.assert_array_equal(images[bad_at], ds[(bad_at + 1) % 40][0].numpy())  # the next image stands in
    warnings = [line for line in capsys.readouterr().err.splitlines() if str(bad_file) in line]
    assert len(warnings) == 1 and "in its place" in warnings[0]  # once per bad image, however often it is read


def test_cli_reports_an_error_from_a_train_worker(monkeypatch, capsys) -> None:
    """A BadImageError raised inside a Ray Train worker reaches the driver wrapped: still exit 2, one line."""
    from ray.train import WorkerGroupError

    from pcl_ray.data import BadImageError

    def failing_train(args):
        try:
            raise WorkerGroupError("rank 1 failed", {1: BadImageError("/data/train/dog/dog03.png: cannot decode")})
        except WorkerGroupError as exc:
            raise RuntimeError("training failed") from exc

    monkeypatch.setattr(cli, "cmd_train", failing_train)
    assert cli.main(["train", str(TINY)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: /data/train/dog/dog03.png: cannot decode"

    def other_failure(args):
        raise RuntimeError("not a config problem")

    monkeypatch.setattr(cli, "cmd_train", other_failure)
    with pytest.raises(RuntimeError, match="not a config problem"):
        cli.main(["train", str(TINY)])


@pytest.mark.parametrize("use_gpu", ["false", "auto"])
def test_fp16_without_a_gpu_stops_before_ray_starts(use_gpu, isolated: Path, monkeypatch, capsys) -> None:
    """``train.precision=fp16`` needs GPU workers: on a machine without CUDA (or with ``ray.use_gpu=false``)
    the driver says so, naming the key, before Ray starts and before anything is written."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    storage = isolated / "runs"
    argv = T("train.precision=fp16", f"ray.use_gpu={use_gpu}", f"ray.storage_path={storage}",
             f"tracking.uri=sqlite:///{isolated / 'mlflow.db'}")
    before = _files(storage)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: train.precision") and "fp16" in err[0], err
    assert not _ray_started()
    assert _files(storage) == before
