# vit-pipeline: `make demo` and `make test` each set themselves up from a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: help install test test-fast demo clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: $(STAMP)  ## create .venv and install the project with its test and demo extras

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test,demo]'
	@touch $@

test: install  ## run every test tier (unit, integration, system)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install  ## unit tests only
	$(PY) -m pytest -m "not integration and not system" $(PYTEST_ARGS)

demo: install  ## run the pipeline end to end on scikit-learn's digits, on the CPU
	@echo "make demo: the data, trainer and stage scripts are not built yet (issues #3-#5)."
	@echo "This demo runs what exists: the demo config, and one training step of its tiny ViT on digits."
	$(PY) -c "import sklearn.datasets as d, torch; \
	from pipeline.config import load_config; from pipeline.model import vit_from_config; \
	c = load_config('demo/pretrain'); print(c.to_yaml()); m = vit_from_config(c.model).init_weights(); \
	x, y = d.load_digits(return_X_y=True); x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8).expand(-1, 3, -1, -1) / 8 - 1; \
	loss = torch.nn.functional.cross_entropy(m(x[:64]), torch.tensor(y[:64])); loss.backward(); \
	print(f'demo ViT {c.model.variant}: {sum(p.numel() for p in m.parameters()):,} params, first-step loss {loss.item():.3f}')"

clean:  ## remove the virtual environment, demo outputs and caches
	rm -rf $(VENV) runs data mlflow.db mlruns .pytest_cache *.egg-info
