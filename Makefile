# Two commands do all the set-up on a fresh machine:
#   make train   - install (once) and train CIFAR10-quick on CIFAR-10 with configs/cifar10_quick.yaml
#   make test    - install (once) and run the whole test suite (what CI runs)
# Extra training arguments: make train ARGS="train.epochs=5 output_dir=runs/try"

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install train test bench clean

install: $(STAMP)

# Pinned versions (constraints.txt) keep torch at 2.14.1 with torchvision 0.29.1; DeepSpeed is an sdist
# whose build imports torch, so it is built against the venv's torch (no build isolation, no CUDA ops).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch torchvision setuptools wheel
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation -c constraints.txt -e ".[test,deepspeed]"
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/distrain train -c configs/cifar10_quick.yaml $(ARGS)

test: $(STAMP)
	bash slurm/local_cluster.sh install
	OMP_NUM_THREADS=1 $(BIN)/pytest -n auto --durations=15 $(ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/compare.py

clean:
	rm -rf $(VENV) build *.egg-info
