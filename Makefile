# Two commands do all the set-up on a fresh machine:
#   make demo   install, get FashionMNIST (get_data.sh), then condense it with DC (ipc 1) at a CPU-sized budget
#   make test   install, then run the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench gpu_check

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

demo: $(VENV)/.installed
	DC_PYTHON=$(PY) ./get_data.sh data
	$(PY) main.py --dataset FashionMNIST --model ConvNet --method DC --ipc 1 --Iteration 50 --eval_every 50 \
		--batch_real 64 --num_exp 1 --num_eval 3 --epoch_eval_train 300 --save_path result/demo

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

bench: $(VENV)/.installed
	$(PY) benchmarks/speed.py

# issue 23: every GPU path in one call of at most 8 minutes (CPU-only parts on a machine without CUDA)
gpu_check:
	sh benchmarks/gpu_check.sh
