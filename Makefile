# vit-pipeline: `make demo` and `make test` each set themselves up from a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEEPSPEED := $(VENV)/bin/deepspeed
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# pytest-xdist workers for `make test` (tests/conftest.py groups the tests that share a fixture)
TEST_WORKERS ?= 2
# Dotted overrides for every demo stage, e.g. make demo DEMO_ARGS=run.seed=1
DEMO_ARGS ?=

.PHONY: help install lint test test-fast demo demo-mae gpu-check wheels clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: $(STAMP)  ## create .venv and install the project with its test and demo extras

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,demo]'
	@touch $@

lint: install  ## ruff (pyproject.toml): pyflakes, pycodestyle at 120 columns, reasons for broad excepts, no dead noqa
	$(VENV)/bin/ruff check .

test: install lint  ## lint, then run every test tier (unit, integration, system)
	$(PY) -m pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

test-fast: install  ## unit tests only
	$(PY) -m pytest -m "not integration and not system" $(PYTEST_ARGS)

demo: install  ## pretrain -> fine-tune at 2x resolution -> evaluate on scikit-learn's digits, 2 CPU ranks
	@rm -rf runs/demo
	$(PY) launch/make_shards.py --source digits --out data/digits --val-fraction 0.2 --max-count 200 --quiet
	@export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 VIT_PIPELINE_ID=demo-$$(date +%Y%m%d-%H%M%S) && set -e && \
	echo "== 1/3 pretrain: tiny ViT at 8 px, ZeRO-2, bf16, activation checkpointing, EMA, validated every 100 steps ($$VIT_PIPELINE_ID)" && \
	$(DEEPSPEED) --num_gpus 2 launch/train.py --config configs/demo/pretrain.yaml $(DEMO_ARGS) && \
	echo "== 2/3 fine-tune at 16 px (pos_embed 4x4 -> 8x8), ZeRO-3, validated every 50 steps" && \
	$(DEEPSPEED) --num_gpus 2 launch/train.py --config configs/demo/finetune.yaml $(DEMO_ARGS) && \
	echo "== 3/3 evaluate on the held-out digits" && \
	$(DEEPSPEED) --num_gpus 2 launch/evaluate.py --config configs/demo/evaluate.yaml $(DEMO_ARGS)
	@$(PY) -c "import json; from pipeline.tracking import ui_url; r = json.load(open('runs/demo/demo-evaluate/report.json')); \
	print(f\"\nDemo done: held-out top-1 {r['top1']:.4f} on {r['num_samples']} digits at 16 px, registered as vit-demo.\"); \
	print('Review it:  $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000'); \
	print('      then open ' + ui_url('sqlite:///mlflow.db', r['mlflow_experiment_id']))"

demo-mae: install  ## MAE on the digits without labels -> fine-tune on 10% of them -> evaluate; and the same fine-tune from scratch
	@rm -rf runs/demo/demo-mae*
	$(PY) launch/make_shards.py --source digits --out data/digits --val-fraction 0.2 --max-count 200 --quiet
	$(PY) launch/make_shards.py --source digits --out data/digits-images --val-fraction 0.2 --max-count 200 --unlabelled --quiet
	$(PY) launch/make_shards.py --source digits --out data/digits-10pct --val-fraction 0.2 --max-count 200 --train-fraction 0.1 --quiet
	@export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 VIT_PIPELINE_ID=demo-mae-$$(date +%Y%m%d-%H%M%S) && set -e && \
	echo "== 1/5 MAE pretraining on the training digits' images alone, k-NN on the labelled ones ($$VIT_PIPELINE_ID)" && \
	$(DEEPSPEED) --num_gpus 2 launch/train.py --config configs/demo/mae.yaml $(DEMO_ARGS) && \
	echo "== 2/5 fine-tune the encoder on 10% of the labels (144 digits)" && \
	$(DEEPSPEED) --num_gpus 2 launch/train.py --config configs/demo/mae_finetune.yaml $(DEMO_ARGS) && \
	echo "== 3/5 evaluate it on the held-out digits" && \
	$(DEEPSPEED) --num_gpus 2 launch/evaluate.py --config configs/demo/mae_evaluate.yaml $(DEMO_ARGS) && \
	echo "== 4/5 the same fine-tune from fresh weights (the baseline)" && \
	$(DEEPSPEED) --num_gpus 2 launch/train.py --config configs/demo/mae_finetune.yaml run.stage=pretrain \
	  run.name=demo-mae-scratch $(DEMO_ARGS) && \
	echo "== 5/5 evaluate the baseline" && \
	$(DEEPSPEED) --num_gpus 2 launch/evaluate.py --config configs/demo/mae_evaluate.yaml run.name=demo-mae-scratch-evaluate \
	  eval.checkpoint=runs/demo/demo-mae-scratch $(DEMO_ARGS)
	@$(PY) -c "import json; r = {n: json.load(open(f'runs/demo/{n}/report.json'))['top1'] for n in ('demo-mae-evaluate', 'demo-mae-scratch-evaluate')}; \
	k = [json.loads(l)['knn/top1'] for l in open('runs/demo/demo-mae/metrics.jsonl') if 'knn/top1' in l]; \
	print(f\"\nMAE demo done: held-out top-1 {r['demo-mae-evaluate']:.4f} from the MAE, {r['demo-mae-scratch-evaluate']:.4f} from scratch, \" \
	f\"on 10% of the labels; knn/top1 during pretraining {k[0]:.3f} -> {k[-1]:.3f}.\")"

gpu-check: install  ## on a GPU machine: benchmarks/gpu_first.py, every phase in 7 minutes, into gpu_first.jsonl
	$(PY) benchmarks/gpu_first.py --results gpu_first.jsonl

# What a GPU machine with torch but no registry lacks, as wheels for its Python (docs/gpu.md).
# WHEEL_PY=3.11 builds the same set for this machine's Python (the test does).
WHEELS ?= .wheels
WHEEL_PY ?= 3.12
GPU_WHEELS := webdataset braceexpand pydantic pydantic-core typing-inspection annotated-types hjson simplejpeg
wheels: install  ## cp312 manylinux wheels of what a GPU machine without a registry lacks (deepspeed built here) into .wheels/
	rm -rf $(WHEELS) && mkdir -p $(WHEELS)
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version $(WHEEL_PY) --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -c constraints.txt -d $(WHEELS) $(GPU_WHEELS)
	$(PY) -m pip wheel --quiet --no-deps --no-build-isolation -c constraints.txt -w $(WHEELS) deepspeed
	@du -sh $(WHEELS)

clean:  ## remove the virtual environment, demo outputs and caches
	rm -rf $(VENV) runs data mlflow.db mlruns .pytest_cache *.egg-info $(WHEELS) gpu_first.jsonl
