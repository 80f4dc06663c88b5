# The two commands a fresh machine needs: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Installs pin every package, the build backend too, to the tested set (constraints.txt);
# pyproject.toml keeps ranges.
PIP := $(PY) -m pip install --quiet --constraint constraints.txt
PIP_INSTALL := $(PIP) --build-constraint constraints.txt

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip  # the venv's own pip predates --build-constraint
	$(PIP_INSTALL) -e ".[all]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fsl-jax train --config experiments/demo/protonet.yaml --set out=runs/demo/protonet
	$(VENV)/bin/fsl-jax eval --run runs/demo/protonet --ways 5 --shots 1 --episodes 1000
	$(VENV)/bin/fsl-jax eval --run runs/demo/protonet --ways 20 --shots 1 --episodes 1000
	$(VENV)/bin/fsl-jax train --config experiments/segmentation/demo.yaml --set out=runs/demo/segmentation
	$(VENV)/bin/fsl-jax eval --run runs/demo/segmentation
	$(VENV)/bin/fsl-jax export --run runs/demo/segmentation --format coreml --image-input --force --out runs/demo/segmenter.mlpackage
	@echo "Classification run: runs/demo/protonet (checkpoints/, metrics.jsonl, curves.png)"
	@echo "Segmentation run: runs/demo/segmentation (curves.png; predictions in eval.png)"
	@echo "Core ML segmenter: runs/demo/segmenter.mlpackage"

# pytest exits 5 when it collected no test: that is a failure here too. The test files run in
# TEST_WORKERS processes (pytest-xdist), each file whole in one of them: a file's session fixtures
# (trained and exported models) are built once, and the two-host tests never run beside each other.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

bench: $(STAMP)
	$(PIP_INSTALL) -e ".[bench]"
	$(VENV)/bin/fsl-jax bench maml --peer torch

clean:
	rm -rf $(VENV) runs
