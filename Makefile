PYTHON ?= .venv/bin/python
VENV ?= .venv
WORKDIR ?= runs/demo

.PHONY: install test demo
$(VENV)/bin/python:
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt

install: $(VENV)/bin/python

# The README's test command. Two workers (the machines have 2 cores); one worker per test file, so each
# module-scoped fixture (a tiny trained run) is built once.
test: install
	$(PYTHON) -m pytest -q -n 2 --dist loadfile tests

# Trains the IAF 2/320 model on the digits images shipped inside scikit-learn (offline), then evaluates
# it with K=128 importance samples and writes samples and reconstructions to $(WORKDIR)/demo.png.
demo: install
	$(PYTHON) train.py --config=configs/mnist.py:demo --workdir=$(WORKDIR)
	$(PYTHON) evaluate.py --workdir=$(WORKDIR) --num_samples=128 --split=test
	$(PYTHON) evaluate.py --workdir=$(WORKDIR) --mode=sample --num=64
