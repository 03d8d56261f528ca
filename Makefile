# Two entry points: `make demo` (install, phantoms, train, evaluate, report) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   ?= outputs/demo
# demo recipe: bundles/brats_gmd/configs/demo.yaml (4 minutes of training on 2 CPU cores; a GPU is used when present)
DEMO_STRATEGY ?= gmd_approx
DEMO_MINUTES  ?= 4

.PHONY: install demo test test-gpu bench bench-gpu clean

# $(call need_cuda,TARGET): stop with the fix unless PYTHON's torch sees a GPU (a PYTHON without torch, such as
# the default python3, gets the same one line instead of a traceback)
need_cuda = @$(PYTHON) -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('torch') and __import__('torch').cuda.is_available() else '$(1) needs a visible GPU and the CUDA build of torch (pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128, then pip install -r requirements.txt) in the environment of PYTHON=$(PYTHON); set PYTHON to that environment\'s python')"

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: install
	rm -rf $(DEMO)
	$(BIN)/python -m app phantoms --out $(DEMO)/data/train --cases 16 --size 48 --seed 0
	$(BIN)/python -m app phantoms --out $(DEMO)/data/test --cases 8 --size 48 --seed 1000
	$(BIN)/python -m monai.bundle run --config_file "['bundles/brats_gmd/configs/train.yaml','bundles/brats_gmd/configs/demo.yaml']" \
		--bundle_root bundles/brats_gmd --dataset_dir $(DEMO)/data/train --output_dir $(DEMO)/train \
		--strategy $(DEMO_STRATEGY) --time_limit_minutes $(DEMO_MINUTES)
	$(BIN)/python -m monai.bundle run \
		--config_file "['bundles/brats_gmd/configs/train.yaml','bundles/brats_gmd/configs/demo.yaml','bundles/brats_gmd/configs/evaluate.yaml']" \
		--bundle_root bundles/brats_gmd --dataset_dir $(DEMO)/data/test \
		--ckpt_path $(DEMO)/train/models/model.pt --output_dir $(DEMO)
	$(BIN)/python -m app plot-conflicts $(DEMO)/train --out $(DEMO)
	@echo "Report: $(DEMO)/subset_dice.{md,json,csv,png}; GMD diagnostics: $(DEMO)/gmd_*.png"

# TEST_WORKERS test processes (pytest-xdist); --dist loadfile keeps each test file, and its trained fixtures, in one
# process. TEST_WORKERS=0 runs the suite in this process only.
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

# The whole suite where CUDA is visible, so that every test that picks CUDA when present runs on it and the
# CUDA-only tests run too: PYTHON=path/to/python of an environment with the CUDA build of torch and requirements.txt.
test-gpu:
	$(call need_cuda,test-gpu)
	$(PYTHON) -m pytest -q -rs tests

bench: install
	$(BIN)/python bench/gmd_step.py --device cpu --patch 64 64 64 --batch 1 --features 8 16 32 64 --steps 3

# The GPU figures of the README (GMD step at 128^3 in bf16, inference, the 6-minute equal-budget
# comparison on real 2 mm BraTS), in an environment with the CUDA build of torch: PYTHON=path/to/python.
DATA_2MM  ?= ../shared/data/brats18_dev_2mm
BENCH_GPU ?= outputs/bench_gpu
ABLATE_GPU = --bundle bundles/brats_gmd --max_epochs 100000 --time_limit_minutes 6 --val_interval 1000 \
	--output_dir $(BENCH_GPU)/ablation_brats_2mm --dataset_dir $(DATA_2MM) --seed 0 --patch_size "[96,96,64]" \
	--batch_size 2 --num_samples 2 --learning_rate 0.001 --epoch_length 100 --num_workers 3 --deterministic false
bench-gpu:
	$(call need_cuda,bench-gpu)
	mkdir -p $(BENCH_GPU)
	$(PYTHON) bench/gmd_step.py --device cuda --patch 128 128 128 --batch 1 --features 16 32 64 128 256 \
		--steps 10 --amp > $(BENCH_GPU)/gmd_step.jsonl
	cat $(BENCH_GPU)/gmd_step.jsonl
	$(PYTHON) bench/infer.py --devices cuda --repeats 5 > $(BENCH_GPU)/infer.txt
	cat $(BENCH_GPU)/infer.txt
	# the 4 strategies side by side on the one GPU, as the README's table was measured; then the table
	pids=""; for s in plain dropout gmd:5 gmd; do \
		$(PYTHON) -m app ablate --strategies $$s $(ABLATE_GPU) > $(BENCH_GPU)/ablate_$$s.log 2>&1 & pids="$$pids $$!"; \
		sleep 3; done; \
	for p in $$pids; do wait $$p || { echo "a strategy failed: see $(BENCH_GPU)/ablate_*.log"; exit 1; }; done
	$(PYTHON) -m app ablate --strategies plain,dropout,gmd:5,gmd $(ABLATE_GPU)

clean:
	rm -rf outputs
