# The README's two set-up commands: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench ui docs docs-serve clean

install: $(STAMP)

# Re-install when the pins change. torch==2.13.0 comes from the local CPU wheel where there is one.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The whole learning cycle on embedded defaults (tiny profile, synthetic bars, sqlite MLflow store).
# A bigger profile is one flag away: make demo DEMO_CONFIG=conf/default.yaml
# A shadow period (the first model earns Production in Staging first):
#   make demo DEMO_SET="--set promotion.shadow_bars=100 --set promotion.shadow_min_trades=1"
DEMO_CONFIG ?= conf/smoke.yaml
DEMO_SET ?=
demo: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pipelines.orchestrate --mode all --config $(DEMO_CONFIG) $(DEMO_SET)

test: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

bench: $(STAMP)
	$(PY) benchmarks/env_throughput.py

# MLflow UI on the embedded store (the sqlite file the demo writes).
ui: $(STAMP)
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

# The documentation site (docs/, mkdocs.yml): a strict build into site/ (a broken link fails), or a
# live preview on 127.0.0.1:8000 while editing.
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict

docs-serve: $(STAMP)
	$(VENV)/bin/mkdocs serve --dev-addr 127.0.0.1:8000

clean:
	rm -rf $(VENV) mlflow.db mlruns mlartifacts data deploy site
