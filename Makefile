# Two entry points: `make demo` (install, phantoms, train, evaluate, report) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   ?= outputs/demo
# demo recipe: configs/demo.yaml (4 minutes of training on 2 CPU cores; a GPU is used when present)
DEMO_STRATEGY ?= gmd_approx
DEMO_MINUTES  ?= 4

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
	$(BIN)/python -m monai.bundle run --config_file "['bundles/brats_gmd/configs/train.yaml','configs/demo.yaml']" \
		--bundle_root bundles/brats_gmd --dataset_dir $(DEMO)/data/train --output_dir $(DEMO)/train \
		--strategy $(DEMO_STRATEGY) --time_limit_minutes $(DEMO_MINUTES)
	$(BIN)/python -m monai.bundle run \
		--config_file "['bundles/brats_gmd/configs/train.yaml','configs/demo.yaml','bundles/brats_gmd/configs/evaluate.yaml']" \
		--bundle_root bundles/brats_gmd --dataset_dir $(DEMO)/data/test \
		--ckpt_path $(DEMO)/train/models/model.pt --output_dir $(DEMO)
	$(BIN)/python -m app plot-conflicts $(DEMO)/train --out $(DEMO)
	@echo "Report: $(DEMO)/subset_dice.{md,json,csv,png}; GMD diagnostics: $(DEMO)/gmd_*.png"

test: install
	$(BIN)/python -m pytest -q tests

bench: install
	$(BIN)/python bench/gmd_step.py --device cpu --patch 64 64 64 --batch 1 --features 8 16 32 64 --steps 3

clean:
	rm -rf outputs
