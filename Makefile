# Set-up and checks. Everything installs into ./.venv: the import name `poetry` would clash with the packaging tool
# Poetry in a shared environment.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
DATA ?= data/sample/train-data
export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_PROGRESS_BARS ?= 1
export TQDM_DISABLE ?= 1

ifndef RUN
RUN := runs/demo-$(shell date +%Y%m%d-%H%M%S)
endif
DEMO_FLAGS ?=

.PHONY: install install-demo lint test test-slow bench demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first and pinned: it is a CPU wheel on local disk, while an unpinned torch pulls a multi-GB CUDA build
$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	touch $@

$(VENV)/.installed: setup.cfg pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install -q -e '.[dev,serve,track]'
	touch $@

$(VENV)/.installed-demo: setup.cfg pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[dev,serve,track,demo]'
	touch $@

install: $(VENV)/.installed
install-demo: $(VENV)/.installed-demo

# pyflakes, pycodestyle at 120 columns, isort and bugbear (pyproject.toml [tool.ruff])
lint: install
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q

# The report's browser test needs Debian's chromium (and CJK fonts for readable screenshots): installed when missing
# and possible (root, apt); without it that test is skipped and says why.
test-slow: install-demo
	@command -v chromium >/dev/null || { apt-get update -q && apt-get install -y -q chromium fonts-noto-cjk; } \
		>/dev/null 2>&1 || echo "note: Debian's chromium could not be installed: the browser test will be skipped"
	$(BIN)/python -m pytest -q -m slow

# The CPU benchmarks (bench/README.md): parity and speed against HF Trainer, padding, the chunked loss and the decoder
# on Gemma-3-270M, poetry.memory's estimate against measured peaks, choose_id by letter and by likelihood, and the
# serving under concurrent load, and the GPU script's CPU smoke run. Each saves its JSON under bench/results/.
bench: install-demo
	$(BIN)/python bench/trainer.py parity
	$(BIN)/python bench/trainer.py speed --config configs/tiny.yaml --steps 8 --rounds 1
	$(BIN)/python bench/trainer.py padding data.train=$(DATA)
	$(BIN)/python bench/loss.py --config configs/demo.yaml --methods target chunked --repeats 1
	$(BIN)/python bench/memory.py
	$(BIN)/python bench/decode.py --threads 1 --repeats 1
	$(BIN)/python bench/choose.py --questions data/sample/eval.json --gold data/sample/eval_gold.json --label zero-shot
	$(BIN)/python bench/serve.py --phases 1:8 16:32
	$(BIN)/python bench/gpu.py --cpu-smoke

# The whole product on the real pretrained Gemma-3-270M, through the same CLIs a researcher uses: fine-tune, then
# answer the held-out validation questions with and without the adapter, then score both side by side.
# BERTScore uses Gemma-3-270M's own layer 9 (no Chinese BERT installs offline): comparable within this table only.
# The fine-tuned column uses the final adapter, not the best one: the best is chosen on these same held-out poems.
demo: install-demo
	@set -e; \
	gemma=$$($(BIN)/python -m poetry.builtin.gemma270m); \
	$(BIN)/python train.py --config configs/demo.yaml log.dir=$(RUN) data.train=$(DATA) $(DEMO_FLAGS); \
	$(BIN)/python -m poetry.data export-val --config $(RUN)/config.yaml --out $(RUN)/heldout; \
	$(BIN)/python infer.py --model $$gemma --input $(RUN)/heldout/questions.json --output $(RUN)/zero_shot.json \
		--batch-size 16 --max-new-tokens 32; \
	final=$$(ls -d $(RUN)/checkpoints/step-* | tail -n 1); \
	$(BIN)/python infer.py --model $$gemma --adapter $$final --input $(RUN)/heldout/questions.json \
		--output $(RUN)/finetuned.json --batch-size 16 --max-new-tokens 32; \
	$(BIN)/python evaluate.py --gold $(RUN)/heldout/gold.json --pred $(RUN)/zero_shot.json --label zero-shot \
		--pred $(RUN)/finetuned.json --label fine-tuned --bertscore-model $$gemma --bertscore-layer 9 \
		--report $(RUN)/report.json; \
	page=$$($(BIN)/python -m poetry.report $(RUN)); \
	echo "run directory: $(RUN)  (metrics.jsonl, loss.png, val.png, checkpoints/, zero_shot.json, finetuned.json, report.json, report.html)"; \
	echo "run report, opens offline in any browser: $$page"

clean:
	rm -rf $(VENV) runs
