"""The run registry: safe names, records per pipeline, the fallback order of a run's states."""

from __future__ import annotations

import pytest

from pcl_ray.config import ConfigError
from pcl_ray.registry import (RunRecord, check_name, checkpoint_states, latest_run, load_record, run_exists,
                              save_record, state_candidates)
from pcl_ray.storage import Storage


@pytest.mark.parametrize("name", ["pcl-fashion-mnist-20261202-101010", "a", "sweep_1.t2", "R2D2"])
def test_safe_names_pass(name):
    assert check_name(name, "ray.run_name") == name


@pytest.mark.parametrize("name", ["../../x", "a/b", "", ".hidden", "-flag", "a..b", "x" * 129, "sp ace", "a\\b",
                                  "name\n"])
def test_unsafe_names_are_refused_naming_the_key(name):
    with pytest.raises(ConfigError, match=r"^ray\.run_name: .* is not a safe name"):
        check_name(name, "ray.run_name")


def test_latest_run_is_per_pipeline_and_records_roundtrip(tmp_path):
    storage = Storage.from_uri(tmp_path)
    assert latest_run(storage) is None
    save_record(storage, RunRecord("old-pcl", "id1", "sqlite:///x", pipeline="fmnist_pcl", started_at=100.0))
    save_record(storage, RunRecord("new-moco", "id2", "sqlite:///x", pipeline="fmnist_moco", started_at=200.0))
    save_record(storage, RunRecord("mid-pcl", "id3", "sqlite:///x", pipeline="fmnist_pcl", started_at=150.0))
    assert latest_run(storage) == "new-moco"
    assert latest_run(storage, "fmnist_pcl") == "mid-pcl"
    assert latest_run(storage, "digits_tiny") is None
    rec = load_record(storage, "mid-pcl")
    assert (rec.mlflow_run_id, rec.pipeline, rec.started_at) == ("id3", "fmnist_pcl", 150.0)
    assert load_record(storage, "nobody") is None
    (tmp_path / ".pcl_ray" / "broken.json").write_text("{not json")
    assert load_record(storage, "broken") is None and latest_run(storage) == "new-moco"
    assert run_exists(storage, "old-pcl") and not run_exists(storage, "nobody")


def test_state_candidates_final_first_then_checkpoints_newest_first(tmp_path):
    storage = Storage.from_uri(tmp_path)
    for d in ("checkpoint_2026-12-01_10-00-00.000001", "checkpoint_2026-12-01_11-00-00.000002"):
        storage.write_bytes(f"run/{d}/state.pt", b"x")
    storage.write_bytes("run/checkpoint_2026-12-01_12-00-00.000003/other.bin", b"x")  # no state.pt: skipped
    assert checkpoint_states(storage, "run") == ["run/checkpoint_2026-12-01_11-00-00.000002/state.pt",
                                                 "run/checkpoint_2026-12-01_10-00-00.000001/state.pt"]
    storage.write_bytes("run/final_state.pt", b"x")
    assert state_candidates(storage, "run")[0] == "run/final_state.pt"
    assert len(state_candidates(storage, "run")) == 3
    assert state_candidates(storage, "nothing") == []
