# Two commands do all the set-up: `make demo` and `make test` (each creates .venv and installs if needed).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# CPU PyTorch by default; a GPU user runs `make TORCH_SPEC= ...` (or installs torch first) to keep their own.
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test vae reference notebooks student clean

# After the install, rfc3987-syntax goes: jsonschema imports it, when present, for the 'iri' formats that no schema
# here uses, and it builds ~35 Earley parsers as it loads: ~2.6 s at every start of papermill, otter, nbval,
# JupyterLab and each kernel (an `otter run` here: 17 s with it, 7 s without; jsonschema#1428). Only jsonschema's
# extra asks for it.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip uninstall -q -y rfc3987-syntax
	touch $@

install: $(VENV)/.installed

# The demo keeps to MINUTES, scoring included (--time_budget): where the tiny preset's 3,000 steps do not fit, it
# trains the steps that do, a weaker model on a slow machine (README, "What make demo does"; where 2,100 or fewer fit,
# with resnets that scale and shift their features, which learn more from few steps). MINUTES=0: all 3,000.
MINUTES ?= 10
demo: install
	$(VENV)/bin/hw6 demo --time_budget $(MINUTES)

test: install
	$(PY) -m pytest -q --durations=15

# The shipped autoencoder (data/reference/vae, ~7 min here). Both the tiny and the reference UNets are trained on
# its latents: retraining it means retraining them (make reference; the demo's figures in the README).
vae: install
	$(VENV)/bin/hw6 train-vae --preset reference --vae_out data/reference/vae

# The shipped reference UNet on that autoencoder, its export and its figures (70 min here).
reference: install
	$(VENV)/bin/hw6 train --preset reference
	$(VENV)/bin/hw6 evaluate --preset reference --stage last  # its figures go into the exported model card
	$(VENV)/bin/hw6 export-reference --preset reference --from_checkpoint last --out data/reference
	$(VENV)/bin/hw6 evaluate --preset reference --stage reference
	cp outputs/reference/eval_reference.json data/reference/eval.json  # what make demo prints for the reference

# Run every notebook headless (papermill) on the smoke preset; executed copies in outputs/notebooks/.
# Regrade with the real defaults: `.venv/bin/hw6 run-notebooks -f params.yaml`.
notebooks: install
	$(VENV)/bin/hw6 run-notebooks -p PRESET smoke -p MAX_STEPS 4 -p STAGE last \
		-p DATA_DIR ../outputs/smoke/shapes -p OUTPUT_DIR ../outputs/smoke

# The course's student edition: the notebooks without the exercises' solutions, and otter-grader's autograders.
student: install
	$(VENV)/bin/hw6 assign --out dist

clean:
	rm -rf outputs/ckpt_last outputs/samples_last outputs/png_* outputs/*.csv outputs/*.json outputs/*.png
