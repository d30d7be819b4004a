# Everything a fresh machine needs: a virtual environment with the CPU build of torch and opd.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.opd-installed

.PHONY: quickstart test bench-loss bench-rollout bench-trl bench-gpu bench-scoring bench-scaling bench-quickstart clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/opd quickstart

# one pytest worker a core (at most 4): the tests run single-threaded, torchrun's ranks and
# the servers they start are processes of their own
test: $(STAMP)
	$(PY) -m pytest -n auto --maxprocesses=4

bench-loss: $(STAMP)
	$(PY) bench/loss_memory.py

bench-rollout: $(STAMP)
	$(PY) bench/rollout.py

bench-trl: $(STAMP)
	$(PY) bench/trl_step.py

# CPU size here; on a GPU machine run `bash bench/gpu.sh` (see its header).
bench-gpu: $(STAMP)
	$(PY) bench/gpu.py --size cpu --out bench/results/gpu_results_cpu.json

bench-scoring: $(STAMP)
	$(PY) bench/teacher_scoring.py

bench-scaling: $(STAMP)
	$(PY) bench/scaling.py

bench-quickstart: $(STAMP)
	$(PY) bench/quickstart.py

clean:
	rm -rf $(VENV) runs .cache
