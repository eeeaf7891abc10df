# Two commands on a fresh machine (only Python >= 3.10 and pip needed):
#   make demo   -> installs into .venv, runs the main job (Ray batch labelling) on samples/ offline -> demo_output/
#   make test   -> installs test deps (+ PaddleX 3.7.2 in .venv-paddlex for compatibility tests), runs pytest
PYTHON ?= python3
VENV := .venv
PDX_VENV := .venv-paddlex
LS_VENV := .venv-labelstudio
DM_VENV := .venv-datumaro
PY := $(VENV)/bin/python
PADDLE_SPEC ?= paddlepaddle==3.3.1

.PHONY: demo test test-fast bench clean chromium

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt "$(PADDLE_SPEC)"
	$(PY) -m pip install -q -c constraints.txt -e ".[ray,test,hpi]"
	touch $@

$(PDX_VENV)/.installed: constraints-paddlex.txt
	$(PYTHON) -m venv $(PDX_VENV)
	$(PDX_VENV)/bin/python -m pip install -q --upgrade pip
	$(PDX_VENV)/bin/python -m pip install -q -c constraints-paddlex.txt "paddlex[cv]==3.7.2" "$(PADDLE_SPEC)"
	touch $@

# Label Studio (server + SDK) and datumaro (CVAT's dataset library): test-only, each in its own venv
# (Label Studio pins Django and numpy 2.2; datumaro caps Pillow), for tests/test_label_studio.py and
# tests/test_cvat.py
$(LS_VENV)/.installed: constraints-labelstudio.txt
	$(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/python -m pip install -q --upgrade pip
	$(LS_VENV)/bin/python -m pip install -q -c constraints-labelstudio.txt "label-studio==1.23.2"
	touch $@

$(DM_VENV)/.installed: constraints-datumaro.txt
	$(PYTHON) -m venv $(DM_VENV)
	$(DM_VENV)/bin/python -m pip install -q --upgrade pip
	$(DM_VENV)/bin/python -m pip install -q -c constraints-datumaro.txt "datumaro==1.13.12"
	touch $@

# Debian's Chromium, for tests/test_report.py (report.html in a real headless browser): installed with
# apt-get when missing on a Debian machine run as root (CI); elsewhere that test skips (fails under
# INSTSEG_REQUIRE_TOOLS=1)
chromium:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium not installed: apt-get install chromium (for tests/test_report.py)"

# --ray-address local: the demo starts a Ray of its own even when another cluster runs on the machine
# (joining it would run the demo on that cluster's workers, with their code and paths)
demo: $(VENV)/.installed
	$(PY) -m jobs.batch_predict --input samples/shapes --output demo_output --model-dir samples/model --ray-address local \
		--batch-size 2 --labelme --progress-interval-s 2
	@echo "demo outputs in demo_output/: parts/*.parquet, coco_results.json, coco_dataset.json, labelme/, summary.json, report.html"

# The tests' CPU instruction-set pin (tests/isa_pin.py, README "Tests"), in the environment from the
# start; tests/conftest.py sets the same defaults when pytest is run directly.
test test-fast: export MKL_CBWR ?= COMPATIBLE
test test-fast: export ONEDNN_MAX_CPU_ISA ?= AVX2

test: $(VENV)/.installed $(PDX_VENV)/.installed $(LS_VENV)/.installed $(DM_VENV)/.installed chromium
	INSTSEG_PADDLEX_PYTHON=$(CURDIR)/$(PDX_VENV)/bin/python INSTSEG_LABELSTUDIO_PYTHON=$(CURDIR)/$(LS_VENV)/bin/python \
		INSTSEG_DATUMARO_PYTHON=$(CURDIR)/$(DM_VENV)/bin/python $(PY) -m pytest -q --durations=25

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not paddlex"

bench: $(VENV)/.installed $(PDX_VENV)/.installed
	INSTSEG_PADDLEX_PYTHON=$(CURDIR)/$(PDX_VENV)/bin/python $(PY) bench/predictor_vs_paddlex.py

clean:
	rm -rf $(VENV) $(PDX_VENV) $(LS_VENV) $(DM_VENV) .cache demo_output
