# dho — the two quick-start commands are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch/torchvision are pinned to the build this project is tested with (a newer torch is never required).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
export HF_HUB_OFFLINE ?= 1
export PYTHONUNBUFFERED := 1

.PHONY: setup test demo demo-record demo-teacher reproduce-lowshot clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PINS)
	$(PIP) install -q -e '.[test]'
	touch $@

test: setup
	$(PY) -m pytest -q

# The whole method on embedded real data (scikit-learn digits), offline, CPU, over 5 seeds (~5 min).
DEMO_OUT ?= demo_out
DEMO_ARGS ?=
demo: setup
	$(PY) pipelines/demo/run_demo.py --out $(DEMO_OUT) $(DEMO_ARGS)

# After a `make demo` that should become the README's table: record its results.json and table.
demo-record: setup
	$(PY) pipelines/demo/run_demo.py --out $(DEMO_OUT) --record

# Retrain the demo's stand-in teacher and ship it (pipelines/demo/teacher/): ~40 s of CPU; the digits of
# its fixed pre-training part never change, but another CPU gives other floats, so another checksum.
DEMO_TEACHER := pipelines/demo/teacher
demo-teacher: setup
	rm -rf $(DEMO_OUT)-teacher
	$(PY) pipelines/demo/make_digits.py --out $(DEMO_OUT)-teacher/digits
	$(PY) pipelines/demo/train_teacher.py --data $(DEMO_OUT)-teacher/digits/pretrain --config pipelines/demo/demo-clip.json \
	  --out $(DEMO_OUT)-teacher/teacher.pt --seed 0 --eval $(DEMO_OUT)-teacher/digits/task/train \
	  --eval $(DEMO_OUT)-teacher/digits/task/val --eval $(DEMO_OUT)-teacher/digits/task/test
	mkdir -p $(DEMO_TEACHER)
	gzip -9 -n -c $(DEMO_OUT)-teacher/teacher.pt > $(DEMO_TEACHER)/teacher.pt.gz
	cp $(DEMO_OUT)-teacher/teacher.json $(DEMO_TEACHER)/teacher.json

clean:
	rm -rf $(VENV) demo_out demo_out-teacher build *.egg-info

# =============================================================================================
# reproduce-lowshot: the paper's Table 4 (ImageNet 1% / 10% labels) end to end.
#   make reproduce-lowshot IMAGENET=/data/imagenet [GPUS=8] [WORK=runs/lowshot] [SPLIT_1PCT=f SPLIT_10PCT=f]
#   make reproduce-lowshot SMOKE=1 [WORK=runs/lowshot-smoke]   # the same graph on tiny data, CPU, ~1 min
# Optional: TEACHER_WEIGHTS=FILE|local-dir:DIR (offline DFN weights), LABELED_VIEWS=N (views of the labeled
# caches; default: computed from the schedule, `recipe.py labeled-views`), CLASSNAMES=FILE, SHARD_SIZE=N, SEED=N. Every stage makes a file that exists only when the stage
# is complete, so a rerun skips what is done and resumes the rest. Graph and arithmetic: pipelines/README.md.
# =============================================================================================
DHO = $(VENV)/bin/dho
TORCHRUN = $(VENV)/bin/torchrun
LOWSHOT := pipelines/lowshot
RECIPE = $(PY) $(LOWSHOT)/recipe.py
STUDENTS := vit-b16 vit-l14
SPLITS := 1pct 10pct
SEED ?= 0
ifdef SMOKE
WORK ?= runs/lowshot-smoke
override IMAGENET := $(WORK)/imagenet
override GPUS := 1
SHARD_SIZE ?= 8
RECIPE_vit-b16 := $(LOWSHOT)/smoke.yaml
RECIPE_vit-l14 := $(LOWSHOT)/smoke.yaml
SOURCE_DEPS := $(WORK)/smoke-inputs.done
override TEACHER_WEIGHTS := $(WORK)/smoke-teacher.pt
else
WORK ?= runs/lowshot
GPUS ?= 1
SHARD_SIZE ?= 1000
RECIPE_vit-b16 := $(LOWSHOT)/vit-b16.yaml
RECIPE_vit-l14 := $(LOWSHOT)/vit-l14.yaml
SOURCE_DEPS :=
endif
TEACHER_RECIPE = $(RECIPE_vit-b16)
DATA = $(WORK)/data
CACHE = $(WORK)/cache
RUNS = $(WORK)/runs
EVAL = $(WORK)/eval
CLASSNAMES ?= $(WORK)/classnames.txt
# precompute-teacher and distill: one process, or one per GPU under torchrun
LAUNCH = $(if $(filter 1,$(GPUS)),$(DHO),$(TORCHRUN) --standalone --nproc_per_node=$(GPUS) -m dho.cli)
SPLIT_OPTS_1pct = $(if $(SPLIT_1PCT),--keys $(SPLIT_1PCT),--percent 1 --seed $(SEED))
SPLIT_OPTS_10pct = $(if $(SPLIT_10PCT),--keys $(SPLIT_10PCT),--percent 10 --seed $(SEED))
# recipe overrides per cache: the validation cache holds the evaluation (center) view for the teacher's top-1
TEACHER_SET = $(if $(TEACHER_WEIGHTS),pretrained=$(TEACHER_WEIGHTS))
CACHE_SET_train :=
CACHE_SET_val := views=1 center_view=true
# labeled caches: LABELED_VIEWS, or enough views that no labeled crop repeats more than the recipe's max_labeled_reuse
LABELED_VIEWS_OF = $(if $(LABELED_VIEWS),$(LABELED_VIEWS),$$($(RECIPE) labeled-views $(TEACHER_RECIPE) --labeled $(DATA)/$(1) --pool $(DATA)/train))
CACHE_SET_train-1pct = views=$(call LABELED_VIEWS_OF,train-1pct)
CACHE_SET_train-10pct = views=$(call LABELED_VIEWS_OF,train-10pct)
NEED_IMAGENET = test -d "$(IMAGENET)/train" -a -d "$(IMAGENET)/val" || { echo "error: IMAGENET='$(IMAGENET)' \
	must be a folder with train/ and val/ class folders: make reproduce-lowshot IMAGENET=/path/to/imagenet"; exit 2; }
# GPU stages use every GPU (torchrun): never two at once, even under make -j (SMOKE runs on CPU, in parallel)
ifneq ($(if $(SMOKE),,$(filter reproduce-lowshot $(WORK)/%,$(MAKECMDGOALS))),)
.NOTPARALLEL:
endif

reproduce-lowshot: setup $(WORK)/table.md
	@echo "== table: $(WORK)/table.md"

# SMOKE only: a tiny ImageNet-shaped folder and a random-init tiny teacher checkpoint
$(WORK)/smoke-inputs.done:
	@echo "== smoke inputs -> $(IMAGENET), $(TEACHER_WEIGHTS)"
	mkdir -p $(WORK)
	$(PY) $(LOWSHOT)/make_smoke_data.py --out $(IMAGENET) --teacher-config tests/assets/tiny-clip.json --teacher-out $(TEACHER_WEIGHTS)
	touch $@

# 1. datasets: readable class names (ImageNet folders are WordNet ids), shards, then the named manifest
$(CLASSNAMES): $(SOURCE_DEPS)
	@echo "== class names of $(IMAGENET)/train -> $@"
	@$(NEED_IMAGENET)
	mkdir -p $(@D)
	$(PY) $(LOWSHOT)/classnames.py $(IMAGENET)/train --out $@

$(DATA)/train-shards/manifest.json $(DATA)/val-shards/manifest.json: $(DATA)/%-shards/manifest.json: $(SOURCE_DEPS)
	@echo "== prepare $(IMAGENET)/$* -> $(@D)"
	@$(NEED_IMAGENET)
	$(DHO) prepare $(IMAGENET)/$* --out $(@D) --shard-size $(SHARD_SIZE) --seed $(SEED)

$(DATA)/train/manifest.json $(DATA)/val/manifest.json: $(DATA)/%/manifest.json: $(DATA)/%-shards/manifest.json $(CLASSNAMES)
	@echo "== index $(<D) with class names $(CLASSNAMES) -> $(@D)"
	$(DHO) index $(<D)/*.tar --classnames $(CLASSNAMES) --out $(@D)

$(SPLITS:%=$(DATA)/train-%/manifest.json): $(DATA)/train-%/manifest.json: $(DATA)/train/manifest.json
	@echo "== split $*: labeled subset of $(<D) -> $(@D)"
	$(DHO) split $(<D) --out $(@D) $(SPLIT_OPTS_$*)

# 2. teacher caches (once): the unlabeled pool (all of train), each labeled split, val; a stamp after exit 0
$(SPLITS:%=$(CACHE)/train-%.done): $(DATA)/train/manifest.json
$(CACHE)/%.done: $(DATA)/%/manifest.json $(SOURCE_DEPS)
	@echo "== precompute-teacher $(<D) -> $(CACHE)/$*.zarr"
	mkdir -p $(CACHE)
	$(RECIPE) run $(TEACHER_RECIPE) precompute $(TEACHER_SET) $(CACHE_SET_$*) -- \
	  $(LAUNCH) precompute-teacher $(<D) --out $(CACHE)/$*.zarr
	touch $@

# 3. students: one run per (student, split); resumes from checkpoints/last.pt (distill itself restarts a run that has none)
define lowshot_run
$(RUNS)/$(1)-$(2)/model.pt: STUDENT := $(1)
$(RUNS)/$(1)-$(2)/model.pt: SPLIT := $(2)
$(RUNS)/$(1)-$(2)/model.pt: $(CACHE)/train-$(2).done $(CACHE)/train.done
$(EVAL)/$(1)-$(2).json: STUDENT := $(1)
$(EVAL)/$(1)-$(2).json: $(RUNS)/$(1)-$(2)/model.pt $(DATA)/val/manifest.json
endef
$(foreach s,$(STUDENTS),$(foreach p,$(SPLITS),$(eval $(call lowshot_run,$(s),$(p)))))

$(RUNS)/%/model.pt:
	@echo "== distill $(STUDENT) on the $(SPLIT) labels -> $(@D)"
	$(RECIPE) config $(RECIPE_$(STUDENT)) distill --out $(@D).distill.yaml
	$(LAUNCH) distill --config $(@D).distill.yaml --out $(@D) \
	  --labeled $(DATA)/train-$(SPLIT) --labeled-cache $(CACHE)/train-$(SPLIT).zarr \
	  --unlabeled $(DATA)/train --unlabeled-cache $(CACHE)/train.zarr \
	  $$(test -f $(@D)/checkpoints/last.pt && echo --resume)

# 4. top-1 on val (Eq. 11 with the recipe's alpha, beta), the teacher's zero-shot top-1, the table
$(EVAL)/%.json:
	@echo "== evaluate $(RUNS)/$* on $(DATA)/val"
	mkdir -p $(@D)
	$(RECIPE) run $(RECIPE_$(STUDENT)) evaluate -- $(DHO) evaluate $(RUNS)/$* --data $(DATA)/val --json > $@.tmp
	mv $@.tmp $@

$(EVAL)/teacher.json: $(CACHE)/val.done
	@echo "== teacher zero-shot top-1 on $(DATA)/val (center view of $(CACHE)/val.zarr)"
	mkdir -p $(@D)
	$(DHO) cache-info $(CACHE)/val.zarr --json > $@.tmp
	mv $@.tmp $@

$(WORK)/table.md: $(foreach s,$(STUDENTS),$(foreach p,$(SPLITS),$(EVAL)/$(s)-$(p).json)) $(EVAL)/teacher.json
	@echo "== report -> $@"
	$(PY) $(LOWSHOT)/report.py --eval $(EVAL) --runs $(RUNS) --students "$(STUDENTS)" --splits "$(SPLITS)" \
	  --out $@ $(if $(SMOKE),--smoke)
