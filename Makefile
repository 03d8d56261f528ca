# Two entry points: `make demo` (install, phantoms, train, evaluate, report) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   ?= outputs/demo
# demo knobs: small enough for ~5 minutes of training on 2 CPU cores; a GPU is used when present
DEMO_STRATEGY ?= gmd_approx
DEMO_MINUTES  ?= 4
DEMO_FEATURES ?= [8,16,32,64]
DEMO_PATCH    ?= [32,32,32]

.PHONY: install demo test bench clean

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
	$(BIN)/python -m monai.bundle run --config_file bundles/brats_gmd/configs/train.yaml \
		--bundle_root bundles/brats_gmd --dataset_dir $(DEMO)/data/train --output_dir $(DEMO)/train \
		--strategy $(DEMO_STRATEGY) --max_epochs 200 --time_limit_minutes $(DEMO_MINUTES) \
		--patch_size "$(DEMO_PATCH)" --features "$(DEMO_FEATURES)" --batch_size 2 --num_samples 2 \
		--learning_rate 0.003 --val_interval 4 --diagnostics_interval 5 --progress_bar true
	$(BIN)/python -m monai.bundle run \
		--config_file "['bundles/brats_gmd/configs/train.yaml','bundles/brats_gmd/configs/evaluate.yaml']" \
		--bundle_root bundles/brats_gmd --dataset_dir $(DEMO)/data/test \
		--ckpt_path $(DEMO)/train/models/model.pt --output_dir $(DEMO) \
		--patch_size "$(DEMO_PATCH)" --features "$(DEMO_FEATURES)"
	$(BIN)/python -m app plot-conflicts $(DEMO)/train --out $(DEMO)
	@echo "Report: $(DEMO)/subset_dice.{md,json,csv,png}; GMD diagnostics: $(DEMO)/gmd_*.png"

test: install
	$(BIN)/python -m pytest -q tests

bench: install
	$(BIN)/python bench/gmd_step.py --device cpu --patch 64 64 64 --batch 1 --features 8 16 32 64 --steps 3

clean:
	rm -rf outputs
