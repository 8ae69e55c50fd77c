# pcl-ray: `make demo` sets up and runs the main job, `make test` sets up and runs the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
PIPELINE ?= pipelines/fmnist_pcl.yaml

.PHONY: setup demo test test-all smoke mlflow-ui clean rehearsal

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) run.py train $(PIPELINE)

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m ""

smoke: setup
	$(PY) run.py train pipelines/digits_tiny.yaml

mlflow-ui: setup
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db --host 127.0.0.1 --port 5000 --workers 1

# the cloud layout on one machine (root): head + 2 workers in network namespaces, S3 + MLflow servers, faults
rehearsal: setup
	$(PY) -m pcl_ray.rehearsal

clean:
	rm -rf runs .pytest_cache build dist
