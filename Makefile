# dho — the two quick-start commands are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The tested versions (torch 2.14.1 ...) are pinned in constraints.txt, not in the package metadata.
CONSTRAINTS ?= constraints.txt
export HF_HUB_OFFLINE ?= 1
export PYTHONUNBUFFERED := 1

.PHONY: setup test test-slow demo demo-record demo-teacher reproduce-lowshot reproduce-fewshot reproduce-fewshot-all eval-ood ablation-vlm-heads reproduce-frozen clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c $(CONSTRAINTS) torch torchvision
	$(PIP) install -q -c $(CONSTRAINTS) -e '.[test]'
	touch $@

# test files run in parallel, a file per process (module fixtures are built once), one process per core up to 4;
# `make test` leaves out the tests marked slow (make demo's fresh seed and the two reproduce-* smoke graphs, each
# minutes on 2 cores), `make test-slow` runs those; CI (.ci/run) runs both
test: setup
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile -m "not slow"

test-slow: setup
	$(PY) -m pytest -q -n auto --maxprocesses 3 --dist loadfile -m slow

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
# DEMO_SCENE=cluttered retrains the cluttered scene's teacher (pipelines/demo/teacher-cluttered/: 40 epochs
# over 3774 renders, ~7 min of a quiet 2-core CPU; run_demo.py --scene cluttered).
DEMO_SCENE ?= plain
DEMO_TEACHER := pipelines/demo/$(if $(filter cluttered,$(DEMO_SCENE)),teacher-cluttered,teacher)
demo-teacher: setup
	rm -rf $(DEMO_OUT)-teacher
	$(PY) pipelines/demo/make_digits.py --out $(DEMO_OUT)-teacher/digits --scene $(DEMO_SCENE)
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
#   make reproduce-lowshot IMAGENET=/data/imagenet [GPUS=8] [WORK=runs/lowshot] [SPLIT_1PCT=f SPLIT_10PCT=f] [SPLIT_SEED=13]
#   make reproduce-lowshot SMOKE=1 [WORK=runs/lowshot-smoke]   # the same graph on tiny data, CPU, ~1 min
# Optional: TEACHER_WEIGHTS=FILE|local-dir:DIR (offline DFN weights), LABELED_VIEWS=N (views of the labeled
# caches; default: computed from the schedule, `recipe.py labeled-views`), CLASSNAMES=FILE, SHARD_SIZE=N, SEED=N,
# EVAL_DRAWS=N EVAL_SEED=N (the random-crop evaluation: draws and seed). The 1% / 10% splits
# are the DHO reference's (`--per-class equal`: 13 per class, 128-129 per class, drawn with its seed 13) unless SPLIT_1PCT /
# SPLIT_10PCT name key lists (e.g. SimCLR's). Every stage makes a file that exists only when the stage
# is complete, so a rerun skips what is done and resumes the rest. Graph and arithmetic: pipelines/README.md.
# =============================================================================================
DHO = $(VENV)/bin/dho
TORCHRUN = $(VENV)/bin/torchrun
LOWSHOT := pipelines/lowshot
RECIPE = $(PY) $(LOWSHOT)/recipe.py
STUDENTS := vit-b16 vit-l14
SPLITS := 1pct 10pct
# TEACHER=clip-l14: the ViT-L/14-teacher setting of Tables 5 and 12 (CLIP ViT-L/14@336 -> ViT-B/16 only), own WORK;
# `make ablation-vlm-heads` (Table 5) is in that setting
ifneq ($(filter ablation-vlm-heads reproduce-frozen,$(MAKECMDGOALS)),)
TEACHER ?= clip-l14
endif
TEACHER ?= dfn
ifeq ($(filter dfn clip-l14,$(TEACHER)),)
$(error TEACHER=$(TEACHER): give TEACHER=dfn (DFN ViT-H/14, Table 4) or TEACHER=clip-l14 (CLIP ViT-L/14@336, Tables 5 and 12))
endif
SEED ?= 0
SPLIT_SEED ?= 13
ifdef SMOKE
WORK ?= runs/lowshot-smoke
override IMAGENET := $(WORK)/imagenet
override GPUS := 1
SHARD_SIZE ?= 8
RECIPE_vit-b16 := $(LOWSHOT)/smoke.yaml
RECIPE_vit-l14 := $(LOWSHOT)/smoke.yaml
SOURCE_DEPS := $(WORK)/smoke-inputs.done
override TEACHER_WEIGHTS := $(WORK)/smoke-teacher.pt
EVAL_DRAWS ?= 2
else ifeq ($(TEACHER),clip-l14)
WORK ?= runs/lowshot-clip-l14
GPUS ?= 1
SHARD_SIZE ?= 1000
override STUDENTS := vit-b16
RECIPE_vit-b16 := $(LOWSHOT)/vit-b16-clip-l14.yaml
SOURCE_DEPS :=
EVAL_DRAWS ?= 5
else
WORK ?= runs/lowshot
GPUS ?= 1
SHARD_SIZE ?= 1000
RECIPE_vit-b16 := $(LOWSHOT)/vit-b16.yaml
RECIPE_vit-l14 := $(LOWSHOT)/vit-l14.yaml
SOURCE_DEPS :=
EVAL_DRAWS ?= 5
endif
EVAL_SEED ?= 0
# LOG_GRAD_COSINE=N: every distill of the reproduce targets logs the gradient-conflict diagnostics every N steps
# (Figs. 4 and 13: RUN/grad_cosine.png; the dho and ce+kd runs, the methods that have them); part of each run's config
GRAD_COSINE_OPTS = $(if $(filter-out 0,$(LOG_GRAD_COSINE)),--log-grad-cosine $(LOG_GRAD_COSINE))
TEACHER_RECIPE = $(RECIPE_vit-b16)
DATA = $(WORK)/data
CACHE = $(WORK)/cache
RUNS = $(WORK)/runs
EVAL = $(WORK)/eval
CLASSNAMES ?= $(WORK)/classnames.txt
# precompute-teacher and distill: one process, or one per GPU under torchrun
LAUNCH = $(if $(filter 1,$(GPUS)),$(DHO),$(TORCHRUN) --standalone --nproc_per_node=$(GPUS) -m dho.cli)
# the reference's class-balanced split: the same count for every class, its draw and seed (imagenet_percent.py)
SPLIT_OPTS_1pct = $(if $(SPLIT_1PCT),--keys $(SPLIT_1PCT),--percent 1 --per-class equal --seed $(SPLIT_SEED))
SPLIT_OPTS_10pct = $(if $(SPLIT_10PCT),--keys $(SPLIT_10PCT),--percent 10 --per-class equal --seed $(SPLIT_SEED))
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
ifneq ($(if $(SMOKE),,$(filter reproduce-lowshot reproduce-frozen $(WORK)/%,$(MAKECMDGOALS))),)
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
$(EVAL)/$(1)-$(2).json $(EVAL)/$(1)-$(2).random.json: STUDENT := $(1)
$(EVAL)/$(1)-$(2).json $(EVAL)/$(1)-$(2).random.json: $(RUNS)/$(1)-$(2)/model.pt $(DATA)/val/manifest.json
endef
$(foreach s,$(STUDENTS),$(foreach p,$(SPLITS),$(eval $(call lowshot_run,$(s),$(p)))))

$(RUNS)/%/model.pt:
	@echo "== distill $(STUDENT) on the $(SPLIT) labels -> $(@D)"
	$(RECIPE) config $(RECIPE_$(STUDENT)) distill --out $(@D).distill.yaml
	$(LAUNCH) distill --config $(@D).distill.yaml --out $(@D) $(GRAD_COSINE_OPTS) \
	  --labeled $(DATA)/train-$(SPLIT) --labeled-cache $(CACHE)/train-$(SPLIT).zarr \
	  --unlabeled $(DATA)/train --unlabeled-cache $(CACHE)/train.zarr \
	  $$(test -f $(@D)/checkpoints/last.pt && echo --resume)

# 4. top-1 on val (Eq. 11 with the recipe's alpha, beta) on the center view (S-P.json) and on random crops as the
#    reference scored Table 4 (S-P.random.json: the mean over EVAL_DRAWS seeded draws), the teacher's zero-shot top-1,
#    the table. (Make picks the rule with the shorter stem: S-P.random.json is made by the second rule.)
$(EVAL)/%.json:
	@echo "== evaluate $(RUNS)/$* on $(DATA)/val"
	mkdir -p $(@D)
	$(RECIPE) run $(RECIPE_$(STUDENT)) evaluate -- $(DHO) evaluate $(RUNS)/$* --data $(DATA)/val --json > $@.tmp
	mv $@.tmp $@

$(EVAL)/%.random.json:
	@echo "== evaluate $(RUNS)/$* on $(DATA)/val, random crops ($(EVAL_DRAWS) draws, seed $(EVAL_SEED))"
	mkdir -p $(@D)
	$(RECIPE) run $(RECIPE_$(STUDENT)) evaluate views=random draws=$(EVAL_DRAWS) seed=$(EVAL_SEED) -- \
	  $(DHO) evaluate $(RUNS)/$* --data $(DATA)/val --json > $@.tmp
	mv $@.tmp $@

$(EVAL)/teacher.json: $(CACHE)/val.done
	@echo "== teacher zero-shot top-1 on $(DATA)/val (center view of $(CACHE)/val.zarr)"
	mkdir -p $(@D)
	$(DHO) cache-info $(CACHE)/val.zarr --json > $@.tmp
	mv $@.tmp $@

$(WORK)/table.md: $(foreach s,$(STUDENTS),$(foreach p,$(SPLITS),$(EVAL)/$(s)-$(p).json $(EVAL)/$(s)-$(p).random.json)) $(EVAL)/teacher.json
	@echo "== report -> $@"
	$(PY) $(LOWSHOT)/report.py --eval $(EVAL) --runs $(RUNS) --students "$(STUDENTS)" --splits "$(SPLITS)" \
	  $(if $(SMOKE),--smoke,$(foreach s,$(STUDENTS),--recipe $(s)=$(RECIPE_$(s)))) --out $@

# ablation-vlm-heads: the paper's Table 5 (language-aware init per head, the aligned kd_head) on ImageNet 1% with
# the ViT-B/16 student and the CLIP ViT-L/14@336 teacher (TEACHER=clip-l14, WORK=runs/lowshot-clip-l14):
#   make ablation-vlm-heads IMAGENET=/data/imagenet [GPUS=8]     # 3 more 1% runs beside the full setting's
#   make ablation-vlm-heads SMOKE=1                              # the same graph on the low-shot smoke data
# Rows (Table 5's order): no text init, no aligned head | text init of ce_head only | of both heads | both + aligned
# kd_head (the full setting: the reproduce-lowshot run RUNS/vit-b16-1pct itself). The same data, caches, seed and
# schedule; evaluated on val with the recipe's alpha/beta; WORK/table5.md beside the paper.
# =============================================================================================
ABLATION_ROWS := none ce both
ABLATION_OPTS_none := --no-text-init --no-align-kd-head
ABLATION_OPTS_ce := --text-init-heads ce --no-align-kd-head
ABLATION_OPTS_both := --no-align-kd-head

ablation-vlm-heads: setup $(WORK)/table5.md
	@echo "== table: $(WORK)/table5.md"

$(ABLATION_ROWS:%=$(RUNS)/ablation-%/model.pt): $(RUNS)/ablation-%/model.pt: $(CACHE)/train-1pct.done $(CACHE)/train.done
	@echo "== distill vit-b16 on the 1pct labels, Table 5 row $* ($(ABLATION_OPTS_$*)) -> $(@D)"
	$(RECIPE) config $(RECIPE_vit-b16) distill --out $(@D).distill.yaml
	$(LAUNCH) distill --config $(@D).distill.yaml --out $(@D) $(ABLATION_OPTS_$*) \
	  --labeled $(DATA)/train-1pct --labeled-cache $(CACHE)/train-1pct.zarr \
	  --unlabeled $(DATA)/train --unlabeled-cache $(CACHE)/train.zarr \
	  $$(test -f $(@D)/checkpoints/last.pt && echo --resume)

$(ABLATION_ROWS:%=$(EVAL)/ablation-%.json): $(EVAL)/ablation-%.json: $(RUNS)/ablation-%/model.pt $(DATA)/val/manifest.json
	@echo "== evaluate $(RUNS)/ablation-$* on $(DATA)/val"
	mkdir -p $(@D)
	$(RECIPE) run $(RECIPE_vit-b16) evaluate -- $(DHO) evaluate $(RUNS)/ablation-$* --data $(DATA)/val --json > $@.tmp
	mv $@.tmp $@

$(WORK)/table5.md: $(ABLATION_ROWS:%=$(EVAL)/ablation-%.json) $(EVAL)/vit-b16-1pct.json
	@echo "== report -> $@"
	$(PY) $(LOWSHOT)/ablation_report.py --eval $(EVAL) --runs $(RUNS) --out $@ $(if $(SMOKE),--smoke)

# =============================================================================================
# eval-ood: a run on ImageNet val and its distribution shifts (the paper's Tables 11-12), beside the teacher.
#   make eval-ood RUN=runs/lowshot/runs/vit-b16-1pct IMAGENET_V2=/data/imagenetv2-matched-frequency-format-val \
#       SKETCH=/data/imagenet-sketch/sketch R=/data/imagenet-r A=/data/imagenet-a [VAL=DATASET] [CLASSES=FILE]
#   make eval-ood SMOKE=1   # after `make reproduce-lowshot SMOKE=1`: generated V2/Sketch/R/A-shaped folders
#   [ALPHA=0.5 BETA=1.0]    # Eq. 11's mix for the run's rows: the paper's Tables 11-13 setting by default; ALPHA=run
#                           # BETA=run keep the run's own (alpha_beta.json or model.pt)
#   [STUDENT_PRETRAINED=W]  # weights of the zero-shot student row (default: the run's student_pretrained)
# Each set as distributed: V2's folders 0..999 are class indices, Sketch/R/A's are WordNet ids matched through
# CLASSES (WordNet id<TAB>name per class, as classnames.py writes it); R and A hold 200 of the classes and are
# scored on those. Teacher caches (center view) use the lowshot teacher recipe (TEACHER_RECIPE, TEACHER_WEIGHTS).
# Table 12's zero-shot student row: where the run's student is a CLIP tower with pretrained weights, a center-view
# cache of each set made with the student's own open_clip model and weights (pipelines/ood/student_zs.py).
# Writes OOD_WORK/<run name>.a<ALPHA>-b<BETA>.md; resumable like reproduce-lowshot.
# =============================================================================================
OOD_WORK ?= $(WORK)/ood
OOD_SETS := v2 sketch r a
ALPHA ?= 0.5
BETA ?= 1.0
CLASSES ?= $(CLASSNAMES)
VAL ?= $(DATA)/val
ifdef SMOKE
RUN ?= $(RUNS)/vit-b16-1pct
OOD_SRC = $(OOD_WORK)/src
SRC_v2 = $(OOD_SRC)/v2
SRC_sketch = $(OOD_SRC)/sketch
SRC_r = $(OOD_SRC)/r
SRC_a = $(OOD_SRC)/a
OOD_SOURCE_DEPS := $(OOD_WORK)/src.done
# the smoke student is random init: a saved random-init checkpoint of its tiny config stands in for its weights
STUDENT_PRETRAINED ?= $(OOD_WORK)/smoke-student.pt
else
SRC_v2 = $(IMAGENET_V2)
SRC_sketch = $(SKETCH)
SRC_r = $(R)
SRC_a = $(A)
OOD_SOURCE_DEPS :=
endif
FOLDERS_v2 := index
FOLDERS_sketch := name
FOLDERS_r := name
FOLDERS_a := name
OOD_RUN = $(patsubst %/,%,$(RUN))
OOD_EVAL = $(OOD_WORK)/eval
OOD_DATA_val = $(VAL)
$(foreach s,$(OOD_SETS),$(eval OOD_DATA_$(s) = $(OOD_WORK)/data/$(s)))
OOD_NAME = $(notdir $(OOD_RUN))
# the evaluations and the table are named by Eq. 11's alpha/beta, so another ALPHA/BETA never reuses them
OOD_MIX = a$(ALPHA)-b$(BETA)
OOD_OURS = $(OOD_EVAL)/$(OOD_NAME).$(OOD_MIX)
OOD_MIX_OPTS = $(if $(filter run,$(ALPHA)),,--alpha $(ALPHA)) $(if $(filter run,$(BETA)),,--beta $(BETA))
ifneq ($(filter eval-ood,$(MAKECMDGOALS)),)
ifeq ($(SMOKE)$(wildcard $(OOD_RUN)/model.pt),)
$(error RUN='$(RUN)' must be a finished run folder (with model.pt): make eval-ood RUN=runs/lowshot/runs/vit-b16-1pct IMAGENET_V2=... SKETCH=... R=... A=...)
endif
endif

eval-ood: setup $(OOD_WORK)/$(OOD_NAME).$(OOD_MIX).md
	@echo "== table: $(OOD_WORK)/$(OOD_NAME).$(OOD_MIX).md"

$(OOD_WORK)/src.done: $(WORK)/smoke-inputs.done
	$(PY) pipelines/ood/make_smoke_ood.py --imagenet $(IMAGENET) --out $(OOD_SRC) \
	  --student-config tests/assets/tiny-clip.json --student-out $(OOD_WORK)/smoke-student.pt
	touch $@

$(OOD_SETS:%=$(OOD_WORK)/data/%/manifest.json): $(OOD_WORK)/data/%/manifest.json: $(OOD_SOURCE_DEPS) $(CLASSES)
	@echo "== prepare $* ($(SRC_$*)) with the classes of $(CLASSES) -> $(@D)"
	@test -d "$(SRC_$*)" || { echo "error: the $* set '$(SRC_$*)' is not a folder; pass it as \
	$(if $(filter v2,$*),IMAGENET_V2,$(if $(filter sketch,$*),SKETCH,$(if $(filter r,$*),R,A)))=/path (the class folders as distributed)"; exit 2; }
	$(DHO) prepare $(SRC_$*) --out $(@D) --classes-of $(CLASSES) --class-folders $(FOLDERS_$*) --shard-size $(SHARD_SIZE) --overwrite

# teacher caches (center view) and evaluations: val from VAL, the shifted sets from their prepared datasets
$(OOD_WORK)/cache/val.done $(OOD_OURS)/val.json $(OOD_EVAL)/student-$(OOD_NAME)/val.json: $(VAL)/manifest.json
$(OOD_SETS:%=$(OOD_WORK)/cache/%.done): $(OOD_WORK)/cache/%.done: $(OOD_WORK)/data/%/manifest.json
$(OOD_SETS:%=$(OOD_OURS)/%.json): $(OOD_OURS)/%.json: $(OOD_WORK)/data/%/manifest.json
$(OOD_SETS:%=$(OOD_EVAL)/student-$(OOD_NAME)/%.json): $(OOD_EVAL)/student-$(OOD_NAME)/%.json: $(OOD_WORK)/data/%/manifest.json
$(OOD_WORK)/cache/%.done:
	@echo "== precompute-teacher $(OOD_DATA_$*) (center view) -> $(OOD_WORK)/cache/$*.zarr"
	mkdir -p $(@D)
	$(RECIPE) run $(TEACHER_RECIPE) precompute $(TEACHER_SET) views=1 center_view=true -- \
	  $(LAUNCH) precompute-teacher $(OOD_DATA_$*) --out $(OOD_WORK)/cache/$*.zarr
	touch $@

$(OOD_EVAL)/teacher/%.json: $(OOD_WORK)/cache/%.done
	mkdir -p $(@D)
	$(DHO) cache-info $(OOD_WORK)/cache/$*.zarr --json > $@.tmp
	mv $@.tmp $@

$(OOD_OURS)/%.json: $(OOD_RUN)/model.pt
	@echo "== evaluate $(OOD_RUN) on $(OOD_DATA_$*) (alpha $(ALPHA), beta $(BETA))"
	mkdir -p $(@D)
	$(DHO) evaluate $(OOD_RUN) --data $(OOD_DATA_$*) $(OOD_MIX_OPTS) --json > $@.tmp
	mv $@.tmp $@

# the run's student before distillation (its own zero-shot CLIP), or a note saying why there is none
$(OOD_EVAL)/student-$(OOD_NAME)/%.json: $(OOD_RUN)/config.json $(OOD_SOURCE_DEPS)
	mkdir -p $(@D) $(OOD_WORK)/student-cache/$(OOD_NAME)
	@set -e; rm -f $@.tmp; \
	zs=$$($(PY) pipelines/ood/student_zs.py --run $(OOD_RUN) --note $@.tmp $(if $(STUDENT_PRETRAINED),--pretrained $(STUDENT_PRETRAINED))); \
	if [ -n "$$zs" ]; then \
	  echo "== zero-shot student ($$zs) on $(OOD_DATA_$*) -> $(OOD_WORK)/student-cache/$(OOD_NAME)/$*.zarr"; \
	  $(RECIPE) run $(TEACHER_RECIPE) precompute $$zs views=1 center_view=true -- \
	    $(LAUNCH) precompute-teacher $(OOD_DATA_$*) --out $(OOD_WORK)/student-cache/$(OOD_NAME)/$*.zarr; \
	  $(DHO) cache-info $(OOD_WORK)/student-cache/$(OOD_NAME)/$*.zarr --json > $@.tmp; \
	fi; mv $@.tmp $@

$(OOD_WORK)/$(OOD_NAME).$(OOD_MIX).md: $(foreach s,val $(OOD_SETS),$(OOD_OURS)/$(s).json $(OOD_EVAL)/teacher/$(s).json $(OOD_EVAL)/student-$(OOD_NAME)/$(s).json)
	@echo "== report -> $@"
	$(PY) pipelines/ood/report.py --run $(OOD_RUN) --ours $(OOD_OURS) --eval $(OOD_EVAL) --sets "val $(OOD_SETS)" --out $@ $(if $(SMOKE),--smoke)

# =============================================================================================
# reproduce-frozen: the paper's Table 13 (DHO with adaptation methods on a frozen CLIP ViT-B/16, CLIP ViT-L/14@336
# teacher) end to end: linear evaluation, VPT-deep, CoOp, PromptSRC, each without a teacher, with DHO on the labeled
# split only and with DHO on labeled + unlabeled (pipelines/lowshot/frozen-clip-l14.yaml's recipe.rows).
#   make reproduce-frozen IMAGENET=/data/imagenet IMAGENET_V2=... SKETCH=... R=... A=... [GPUS=8] [ROWS=all|"le vpt3-dho"]
#       [WORK=runs/lowshot-clip-l14] [TEACHER_WEIGHTS=FILE] [CLASSES=FILE]
#   make reproduce-frozen SMOKE=1 [ROWS=...]   # frozen-smoke.yaml's 8 rows (2 per family) on the smoke data, CPU, ~3 min
# The datasets, the 1% split and the teacher caches are reproduce-lowshot TEACHER=clip-l14's (made once, shared: its
# WORK), the 16-shot split (CoOp's sampler, seed 1) and its cache are added; every selected row is one `dho distill`
# (the recipe's distill section + the row's overrides, `recipe.py config --row NAME`; rows with `unlabeled: labeled`
# take the labeled split as their unlabeled stream), evaluated on val and V2/Sketch/R/A as `make eval-ood` does
# (its prepared sets, teacher caches and file names: OOD_WORK/eval/frozen-ROW.a0.5-b1.0/SET.json), at Eq. 11's
# alpha = 0.5, beta = 1.0 (ALPHA/BETA, Table 13's setting); the CLIP zero-shot row is the frozen student's own
# zero-shot classifier (pipelines/ood/student_zs.py); WORK/table13.md: every row of the recipe beside the paper's,
# the rows not run marked so. Resumable like reproduce-lowshot. Cost: 14 student runs of ~99k steps (unmeasured).
# =============================================================================================
ifdef SMOKE
FZ_RECIPE ?= $(LOWSHOT)/frozen-smoke.yaml
# the frozen smoke student: eval-ood's random-init stand-in for pretrained weights (its zero-shot row is this tower's)
FZ_DISTILL_SET := student_pretrained=$(OOD_WORK)/smoke-student.pt
FZ_DEPS := $(OOD_WORK)/src.done
FZ_STUDENT_PRETRAINED := $(OOD_WORK)/smoke-student.pt
else
FZ_RECIPE ?= $(LOWSHOT)/frozen-clip-l14.yaml
FZ_DISTILL_SET :=
FZ_DEPS :=
FZ_STUDENT_PRETRAINED := $(STUDENT_PRETRAINED)
endif
FZ_PAPER := $(LOWSHOT)/frozen-clip-l14.yaml
# the recipe's rows as NAME:SPLIT:UNLABELED, read by awk (the venv may not exist when make parses this file);
# tests/test_pipelines.py checks it against the YAML
FZ_RECIPE_ROWS := $(shell awk '/^recipe:/{r=1;next} /^[a-z]/{r=0} !r{next} /^  rows:/{v=1;next} /^ *\#/{next} \
  v && /^    [a-z]/{n=$$1; sub(/:$$/,"",n); s=$$0; sub(/.*split: */,"",s); sub(/[,}].*/,"",s); \
  u=$$0; sub(/.*unlabeled: */,"",u); sub(/[,}].*/,"",u); print n ":" s ":" u; next} {v=0}' $(FZ_RECIPE))
FZ_ALL_ROWS := $(foreach t,$(FZ_RECIPE_ROWS),$(firstword $(subst :, ,$(t))))
$(foreach t,$(FZ_RECIPE_ROWS),$(eval FZ_SPLIT_$(word 1,$(subst :, ,$(t))) := $(word 2,$(subst :, ,$(t)))) \
  $(eval FZ_UNL_$(word 1,$(subst :, ,$(t))) := $(word 3,$(subst :, ,$(t)))))
ROWS ?= all
FZ_ROWS := $(if $(filter all,$(ROWS)),$(FZ_ALL_ROWS),$(ROWS))
ifneq ($(filter reproduce-frozen,$(MAKECMDGOALS)),)
ifeq ($(if $(SMOKE),clip-l14,$(TEACHER)),dfn)
$(error reproduce-frozen runs Table 13's CLIP ViT-L/14@336 teacher: drop TEACHER=dfn (TEACHER=clip-l14 is its default))
endif
ifneq ($(filter-out $(FZ_ALL_ROWS),$(FZ_ROWS)),)
$(error ROWS: $(filter-out $(FZ_ALL_ROWS),$(FZ_ROWS)) not in $(FZ_RECIPE)'s recipe.rows; give ROWS=all or some of: $(FZ_ALL_ROWS))
endif
ifeq ($(FZ_ROWS),)
$(error ROWS is empty; give ROWS=all or some of: $(FZ_ALL_ROWS))
endif
endif
FZ_SPLITS := $(sort $(foreach r,$(FZ_ROWS),$(FZ_SPLIT_$(r))))
FZ_NEW_SPLITS := $(filter-out $(SPLITS),$(FZ_SPLITS))
FZ_EVAL_SETS := val $(OOD_SETS)
FZ_ZS := $(OOD_EVAL)/student-frozen
FZ_EVALS := $(foreach r,$(FZ_ROWS),$(foreach s,$(FZ_EVAL_SETS),$(OOD_EVAL)/frozen-$(r).$(OOD_MIX)/$(s).json))

reproduce-frozen: setup $(WORK)/table13.md
	@echo "== table: $(WORK)/table13.md"

# the splits only Table 13 uses (16 shots per class): `dho split` with the recipe's recipe.splits options; their caches
# by the teacher caches' rule, with the views this recipe's schedule needs
$(FZ_NEW_SPLITS:%=$(DATA)/train-%/manifest.json): $(DATA)/train-%/manifest.json: $(DATA)/train/manifest.json
	@echo "== split $*: labeled subset of $(<D) -> $(@D)"
	$(DHO) split $(<D) --out $(@D) $$($(RECIPE) split-options $(FZ_RECIPE) $*)
$(FZ_NEW_SPLITS:%=$(CACHE)/train-%.done): $(DATA)/train/manifest.json
$(foreach p,$(FZ_NEW_SPLITS),$(eval CACHE_SET_train-$(p) = views=$(if $(LABELED_VIEWS),$(LABELED_VIEWS),$$$$($(RECIPE) labeled-views $(FZ_RECIPE) --labeled $(DATA)/train-$(p) --pool $(DATA)/train))))

define frozen_row
$(RUNS)/frozen-$(1)/model.pt: FZ_LAB := train-$(2)
$(RUNS)/frozen-$(1)/model.pt: FZ_UNL := $(if $(filter labeled,$(3)),train-$(2),train)
$(RUNS)/frozen-$(1)/model.pt: $(CACHE)/train-$(2).done $(if $(filter labeled,$(3)),,$(CACHE)/train.done) $(FZ_DEPS)
$(foreach s,$(FZ_EVAL_SETS),$(OOD_EVAL)/frozen-$(1).$(OOD_MIX)/$(s).json): FZ_RUN := $(RUNS)/frozen-$(1)
$(foreach s,$(FZ_EVAL_SETS),$(OOD_EVAL)/frozen-$(1).$(OOD_MIX)/$(s).json): $(RUNS)/frozen-$(1)/model.pt
endef
$(foreach r,$(FZ_ROWS),$(eval $(call frozen_row,$(r),$(FZ_SPLIT_$(r)),$(FZ_UNL_$(r)))))
$(foreach r,$(FZ_ROWS),$(foreach s,$(FZ_EVAL_SETS),$(eval $(OOD_EVAL)/frozen-$(r).$(OOD_MIX)/$(s).json: FZ_SET := $(s)) \
  $(eval $(OOD_EVAL)/frozen-$(r).$(OOD_MIX)/$(s).json: $(OOD_DATA_$(s))/manifest.json)))
$(foreach s,$(FZ_EVAL_SETS),$(eval $(FZ_ZS)/$(s).json: $(OOD_DATA_$(s))/manifest.json))

# one run per row; resumes from checkpoints/last.pt
$(FZ_ROWS:%=$(RUNS)/frozen-%/model.pt): $(RUNS)/frozen-%/model.pt:
	@echo "== distill Table 13 row $* ($(FZ_LAB) labeled, $(FZ_UNL) unlabeled) -> $(@D)"
	$(RECIPE) config $(FZ_RECIPE) distill$(if $(FZ_DISTILL_SET), $(FZ_DISTILL_SET)) --row $* --out $(@D).distill.yaml
	$(LAUNCH) distill --config $(@D).distill.yaml --out $(@D) \
	  --labeled $(DATA)/$(FZ_LAB) --labeled-cache $(CACHE)/$(FZ_LAB).zarr \
	  --unlabeled $(DATA)/$(FZ_UNL) --unlabeled-cache $(CACHE)/$(FZ_UNL).zarr \
	  $$(test -f $(@D)/checkpoints/last.pt && echo --resume)

# val and the shifted sets, as eval-ood's evaluations (Eq. 11 at ALPHA, BETA)
$(FZ_EVALS):
	@echo "== evaluate $(FZ_RUN) on $(OOD_DATA_$(FZ_SET)) (alpha $(ALPHA), beta $(BETA))"
	mkdir -p $(@D)
	$(DHO) evaluate $(FZ_RUN) --data $(OOD_DATA_$(FZ_SET)) $(OOD_MIX_OPTS) --json > $@.tmp
	mv $@.tmp $@

# Table 13's "CLIP zero-shot" row: the frozen student's own zero-shot classifier (eval-ood's zero-shot student row)
$(FZ_EVAL_SETS:%=$(FZ_ZS)/%.json): $(FZ_ZS)/%.json: $(RUNS)/frozen-$(firstword $(FZ_ROWS))/model.pt
	mkdir -p $(@D) $(OOD_WORK)/student-cache/frozen
	@set -e; rm -f $@.tmp; \
	zs=$$($(PY) pipelines/ood/student_zs.py --run $(<D) --note $@.tmp $(if $(FZ_STUDENT_PRETRAINED),--pretrained $(FZ_STUDENT_PRETRAINED))); \
	if [ -n "$$zs" ]; then \
	  echo "== zero-shot student ($$zs) on $(OOD_DATA_$*) -> $(OOD_WORK)/student-cache/frozen/$*.zarr"; \
	  $(RECIPE) run $(TEACHER_RECIPE) precompute $$zs views=1 center_view=true -- \
	    $(LAUNCH) precompute-teacher $(OOD_DATA_$*) --out $(OOD_WORK)/student-cache/frozen/$*.zarr; \
	  $(DHO) cache-info $(OOD_WORK)/student-cache/frozen/$*.zarr --json > $@.tmp; \
	fi; mv $@.tmp $@

$(WORK)/table13.md: $(FZ_EVALS) $(foreach s,$(FZ_EVAL_SETS),$(OOD_EVAL)/teacher/$(s).json $(FZ_ZS)/$(s).json)
	@echo "== report -> $@"
	$(PY) $(LOWSHOT)/frozen_report.py --recipe $(FZ_RECIPE) --paper $(FZ_PAPER) --runs $(RUNS) --eval $(OOD_EVAL) \
	  --mix $(OOD_MIX) --rows "$(FZ_ROWS)" --out $@ $(if $(SMOKE),--smoke)

# =============================================================================================
# reproduce-fewshot: the few-shot experiments (Table 1, Figs. 5/6) on one dataset of the CoOp benchmark.
#   make reproduce-fewshot DATASET=oxford_pets ROOT=/data/coop [SHOTS="1 2 4 8 16"] [SEEDS="1 2 3"] [GPUS=N]
#       [FS_RECIPE=pipelines/fewshot/coop-resnet18.yaml] [FS_WORK=runs/fewshot/DATASET] [TEACHER_WEIGHTS=FILE] [FS_VAL=fewshot|full]
#   make reproduce-fewshot DATASET=imagenet ROOT=/data/coop FS_RECIPE=pipelines/fewshot/resnet18-scratch.yaml GPUS=4
#   make reproduce-fewshot SMOKE=1 [FS_WORK=runs/fewshot-smoke]   # generated CoOp-layout data, tiny models, CPU
#   make reproduce-fewshot ... VARIANTS=all   # also Table 14's non-linear-head variants of the recipe (recipe.variants)
# Per K shots and seed S: the labeled split (K per class of train) and the few-shot val (min(K, 4) per class of
# CoOp's val, from the same random stream right after the train shots; ImageNet: of train), both drawn by CoOp's sampler
# (`dho split --sampler coop`: CoOp's shots for seed S; the DHO reference's own for S = 1), teacher caches with image
# embeddings, Tip-Adapter-F fitted on them with the dataset's official Tip-Adapter settings
# (`dho tip-adapter --preset coop:DATASET`) (DHO-F),
# a student from each teacher (zs: the zero-shot teacher, fs: Tip-Adapter-F), evaluation on test; then
# FS_WORK/table.md: mean ± std over the seeds beside the paper. Resumable like reproduce-lowshot.
# Baselines (BASELINES=0: none; BASELINES="ce ce+kd": these): the recipe's `baselines:` single-head methods
# (ImageNet: Table 1's KD, CE, CE+KD (logit), CE+KD (feature), SHO + PCGrad, and §4.2's dual-head SSKD, DHKD; the ten
# datasets: the CE+KD curve of Figs. 5/8/11), each `dho distill --method M` from the zero-shot teacher's caches on
# every (K, seed), KD (no labels) once per seed. Cost: one student run each, the same steps as DHO's (an epoch is a
# pass over the same unlabeled stream), no teacher work: the seven ImageNet baselines add 6 x 5 x 3 + 3 = 93 runs to
# DHO's 30 (zs + fs); SMOKE runs them on
# the first (K, seed) only.
# =============================================================================================
ifdef SMOKE
FS_DATASET := $(or $(DATASET),oxford_pets)
SMOKE_DATA_SEED ?= 0
FS_WORK ?= runs/fewshot-smoke
FS_ROOT = $(FS_WORK)/coop
FS_RECIPE ?= pipelines/fewshot/coop-smoke.yaml
SHOTS ?= 1 2
SEEDS ?= 1 2
FS_SOURCE = $(FS_WORK)/smoke-inputs.done
FS_TEACHER_SET = pretrained=$(FS_WORK)/smoke-teacher.pt
else
FS_DATASET = $(DATASET)
FS_WORK ?= runs/fewshot/$(DATASET)
FS_ROOT = $(ROOT)
FS_RECIPE ?= pipelines/fewshot/coop-resnet18.yaml
SHOTS ?= 1 2 4 8 16
SEEDS ?= 1 2 3
FS_SOURCE :=
FS_TEACHER_SET = $(if $(TEACHER_WEIGHTS),pretrained=$(TEACHER_WEIGHTS))
endif
# the recipe's `baselines: [a, b]` read without Python (the venv may not exist yet when make parses this file);
# tests/test_pipelines.py checks it against the YAML of every recipe
FS_RECIPE_BASELINES = $(shell sed -n 's/^  baselines: *\[\([^]]*\)\].*/\1/p' $(FS_RECIPE) | tr ',' ' ')
ifeq ($(origin BASELINES),undefined)
FS_BASELINES := $(FS_RECIPE_BASELINES)
else ifeq ($(BASELINES),0)
FS_BASELINES :=
else
FS_BASELINES := $(BASELINES)
endif
# Table 14's variants (VARIANTS=all: the recipe's `recipe.variants`, read by awk; VARIANTS="nl-head-kd": these): each a
# DHO run from the zero-shot teacher with the variant's distill keys (`recipe.py config --variant NAME`), on every
# (K, seed) (SMOKE: the first); evaluated as DHO (alpha/beta chosen on val); a row each in the table
FS_RECIPE_VARIANTS = $(shell awk '/^recipe:/{r=1;next} /^[a-z]/{r=0} r && /^  variants:/{v=1;next} \
  v && /^    [a-z]/{sub(/:.*/,"");sub(/^ +/,"");print;next} {v=0}' $(FS_RECIPE))
FS_VARIANTS := $(if $(filter all,$(VARIANTS)),$(FS_RECIPE_VARIANTS),$(VARIANTS))
ifneq ($(filter-out $(FS_RECIPE_VARIANTS),$(FS_VARIANTS)),)
$(error VARIANTS: $(filter-out $(FS_RECIPE_VARIANTS),$(FS_VARIANTS)) not in $(FS_RECIPE)'s recipe.variants ($(or $(FS_RECIPE_VARIANTS),none)))
endif
FS_VARIANT_RUNS = $(foreach v,$(FS_VARIANTS),$(foreach p,$(FS_BASELINE_PAIRS),$(v)-$(p)))
FS_DATA = $(FS_WORK)/data
# a baseline that is a method with options (names.BASELINE_VARIANTS; tests/test_pipelines.py keeps them equal): its
# `dho distill` flags; any other baseline M runs `--method M`
FS_BASELINE_FLAGS_ce+kd+pcgrad = --method ce+kd --grad-surgery pcgrad
FS_CACHE = $(FS_WORK)/cache
FS_RUNS = $(FS_WORK)/runs
FS_EVAL = $(FS_WORK)/eval
FS_PAIRS = $(foreach k,$(SHOTS),$(foreach s,$(SEEDS),k$(k)-s$(s)))
# the (K, seed) pairs of the baseline runs; KD (no labels) runs once per seed, on the first K's split
# (SMOKE: the first only, or every pair with SMOKE_BASELINE_PAIRS=all as reproduce-fewshot-all's smoke form)
FS_BASELINE_PAIRS = $(if $(SMOKE),$(if $(filter all,$(SMOKE_BASELINE_PAIRS)),$(FS_PAIRS),$(firstword $(FS_PAIRS))),$(FS_PAIRS))
FS_KD_PAIRS = $(filter $(FS_BASELINE_PAIRS),$(foreach s,$(SEEDS),k$(firstword $(SHOTS))-s$(s)))
FS_BASELINE_RUNS = $(foreach m,$(FS_BASELINES),$(foreach p,$(if $(filter kd,$(m)),$(FS_KD_PAIRS),$(FS_BASELINE_PAIRS)),$(m)-$(p)))
# the few-shot validation split: min(K, 4) per class of CoOp's val, as CoOp draws it (FS_VAL=fewshot: its sampler, its
# random stream continued after the K-shot train draw, `--after`), or the whole val, as the DHO reference code
# (train_others.py) scores its epochs and alpha/beta (FS_VAL=full)
FS_VAL ?= fewshot
ifneq ($(filter fewshot full,$(FS_VAL)),$(FS_VAL))
$(error FS_VAL=$(FS_VAL): give FS_VAL=fewshot (min(K, 4) per class of val) or FS_VAL=full)
endif
FS_VAL_SHOTS = $(if $(filter 1 2 3,$(1)),$(1),4)
FS_VAL_SPLIT = $(if $(filter full,$(FS_VAL)),--percent 100,--shots $(call FS_VAL_SHOTS,$(1)) --sampler coop --after $(FS_DATA)/lab-$(2))
# CoOp datasets use their CoOp prompt; ImageNet keeps the recipe's (Tip-Adapter's 7 prompts, as the reference)
FS_PRE = $(RECIPE) run $(FS_RECIPE) precompute $(FS_TEACHER_SET) $(if $(filter imagenet,$(FS_DATASET)),,templates=coop:$(FS_DATASET))
FS_LAUNCH = $(if $(filter 1,$(GPUS)),$(DHO),$(TORCHRUN) --standalone --nproc_per_node=$(GPUS) -m dho.cli)
FS_NEED = test -n "$(FS_DATASET)" -a -d "$(FS_ROOT)" || { echo "error: give DATASET=NAME ROOT=FOLDER (CoOp's layout): \
	make reproduce-fewshot DATASET=oxford_pets ROOT=/data/coop"; exit 2; }
# DHO-F predicts with Table 6's few-shot alpha where the recipe fixes alpha/beta (ImageNet)
FS_EVAL_SET_fs = $$(a=$$($(RECIPE) get $(FS_RECIPE) recipe dho_f_alpha); test -n "$$a" && echo alpha=$$a)
FS_EVAL_SET_zs =

reproduce-fewshot: setup $(FS_WORK)/table.md $(FS_WORK)/results.json
	@echo "== table: $(FS_WORK)/table.md"

$(FS_WORK)/smoke-inputs.done:
	@echo "== smoke inputs -> $(FS_WORK)/coop, $(FS_WORK)/smoke-teacher.pt"
	mkdir -p $(FS_WORK)
	$(PY) pipelines/fewshot/make_smoke_coop.py --root $(FS_WORK)/coop --dataset $(FS_DATASET) --classes 4 --train 12 --val 6 \
	  --test 8 --seed $(SMOKE_DATA_SEED) --teacher-config tests/assets/tiny-clip.json --teacher-out $(FS_WORK)/smoke-teacher.pt
	touch $@

# 1. the benchmark's train/val/test, its K-shot splits and few-shot validation splits
$(FS_DATA)/import.done: $(FS_SOURCE)
	@$(FS_NEED)
	@echo "== import-coop $(FS_DATASET) from $(FS_ROOT) -> $(FS_DATA)"
	$(DHO) import-coop $(FS_DATASET) $(FS_ROOT) --out $(FS_DATA) --overwrite
	touch $@

# 2. caches of the whole train pool and of test (teacher's top-1), with the embeddings Tip-Adapter-F needs
$(FS_CACHE)/pool.done: $(FS_DATA)/import.done
	@echo "== precompute-teacher $(FS_DATA)/train -> $(FS_CACHE)/pool.zarr"
	$(FS_PRE) -- $(FS_LAUNCH) precompute-teacher $(FS_DATA)/train --out $(FS_CACHE)/pool.zarr
	touch $@
$(FS_CACHE)/test.done: $(FS_DATA)/import.done
	@echo "== precompute-teacher $(FS_DATA)/test -> $(FS_CACHE)/test.zarr (evaluation view)"
	$(FS_PRE) views=1 center_view=true -- $(FS_LAUNCH) precompute-teacher $(FS_DATA)/test --out $(FS_CACHE)/test.zarr
	touch $@
$(FS_EVAL)/teacher-zs.json: $(FS_CACHE)/test.done
	mkdir -p $(@D)
	$(DHO) cache-info $(FS_CACHE)/test.zarr --json > $@.tmp
	mv $@.tmp $@

# 3. per K and seed: splits, caches, Tip-Adapter-F and its caches, both students, evaluation
define fewshot_pair
$(FS_DATA)/lab-$(1)/manifest.json: $(FS_DATA)/import.done
	@echo "== split $(2) shots, seed $(3) -> $$(@D)"
	$(DHO) split $(FS_DATA)/train --out $$(@D) --shots $(2) --sampler coop --seed $(3) --overwrite \
	  $(if $(filter imagenet,$(FS_DATASET)),--val-per-class $(call FS_VAL_SHOTS,$(2)) --val-out $(FS_DATA)/val-$(1))
$(FS_DATA)/val-$(1)/manifest.json: $(FS_DATA)/import.done $(FS_DATA)/lab-$(1)/manifest.json
	$(if $(filter imagenet,$(FS_DATASET)),test -f $$@,$(DHO) split $(FS_DATA)/val --out $$(@D) $(call FS_VAL_SPLIT,$(2),$(1)) --seed $(3) --overwrite)
$(FS_CACHE)/lab-$(1).done: $(FS_DATA)/lab-$(1)/manifest.json
	$(FS_PRE) views=$$$$($(RECIPE) labeled-views $(FS_RECIPE) --labeled $(FS_DATA)/lab-$(1) --pool $(FS_DATA)/train) -- \
	  $(FS_LAUNCH) precompute-teacher $(FS_DATA)/lab-$(1) --out $(FS_CACHE)/lab-$(1).zarr
	touch $$@
$(FS_CACHE)/val-$(1).done: $(FS_DATA)/val-$(1)/manifest.json
	$(FS_PRE) views=1 center_view=true -- $(FS_LAUNCH) precompute-teacher $(FS_DATA)/val-$(1) --out $(FS_CACHE)/val-$(1).zarr
	touch $$@
$(FS_WORK)/teacher/tipf-$(1).pt: $(FS_CACHE)/lab-$(1).done $(FS_CACHE)/val-$(1).done
	@echo "== tip-adapter: Tip-Adapter-F on $(FS_DATA)/lab-$(1) -> $$@"
	mkdir -p $$(@D)
	$(DHO) tip-adapter --labeled $(FS_DATA)/lab-$(1) --labeled-cache $(FS_CACHE)/lab-$(1).zarr \
	  --val $(FS_DATA)/val-$(1) --val-cache $(FS_CACHE)/val-$(1).zarr --preset coop:$(FS_DATASET) --seed $(3) --out $$@ > $$@.json.tmp
	mv $$@.json.tmp $$@.json
$(FS_CACHE)/pool-tipf-$(1).done: $(FS_WORK)/teacher/tipf-$(1).pt $(FS_CACHE)/pool.done
	$(DHO) tip-adapter-cache $$< --dataset $(FS_DATA)/train --cache $(FS_CACHE)/pool.zarr --out $(FS_CACHE)/pool-tipf-$(1).zarr
	touch $$@
$(FS_CACHE)/lab-tipf-$(1).done: $(FS_WORK)/teacher/tipf-$(1).pt
	$(DHO) tip-adapter-cache $$< --dataset $(FS_DATA)/lab-$(1) --cache $(FS_CACHE)/lab-$(1).zarr --out $(FS_CACHE)/lab-tipf-$(1).zarr
	touch $$@
$(FS_CACHE)/test-tipf-$(1).done: $(FS_WORK)/teacher/tipf-$(1).pt $(FS_CACHE)/test.done
	$(DHO) tip-adapter-cache $$< --dataset $(FS_DATA)/test --cache $(FS_CACHE)/test.zarr --out $(FS_CACHE)/test-tipf-$(1).zarr
	touch $$@
$(FS_EVAL)/teacher-fs-$(1).json: $(FS_CACHE)/test-tipf-$(1).done
	mkdir -p $$(@D)
	$(DHO) cache-info $(FS_CACHE)/test-tipf-$(1).zarr --json > $$@.tmp
	mv $$@.tmp $$@
$(FS_RUNS)/zs-$(1)/model.pt: PAIR := $(1)
$(FS_RUNS)/zs-$(1)/model.pt: SEED_S := $(3)
$(FS_RUNS)/zs-$(1)/model.pt: TEACH := pool lab
$(FS_RUNS)/zs-$(1)/model.pt: $(FS_CACHE)/lab-$(1).done $(FS_CACHE)/pool.done $(FS_DATA)/val-$(1)/manifest.json
$(FS_RUNS)/fs-$(1)/model.pt: PAIR := $(1)
$(FS_RUNS)/fs-$(1)/model.pt: SEED_S := $(3)
$(FS_RUNS)/fs-$(1)/model.pt: TEACH := pool-tipf-$(1) lab-tipf-$(1)
$(FS_RUNS)/fs-$(1)/model.pt: $(FS_CACHE)/lab-tipf-$(1).done $(FS_CACHE)/pool-tipf-$(1).done $(FS_DATA)/val-$(1)/manifest.json
$(FS_EVAL)/zs-$(1).json: $(FS_RUNS)/zs-$(1)/model.pt $(FS_CACHE)/test.done
$(FS_EVAL)/fs-$(1).json: $(FS_RUNS)/fs-$(1)/model.pt $(FS_CACHE)/test.done
endef
$(foreach k,$(SHOTS),$(foreach s,$(SEEDS),$(eval $(call fewshot_pair,k$(k)-s$(s),$(k),$(s)))))

# baselines: `--method M` from the zero-shot teacher's caches; evaluated with the head the method trained (the
# alpha/beta its model stores: the recipe's fixed DHO alpha/beta are dropped)
define fewshot_baseline
$(FS_RUNS)/$(1)-$(2)/model.pt: PAIR := $(2)
$(FS_RUNS)/$(1)-$(2)/model.pt: SEED_S := $(lastword $(subst -s, ,$(2)))
$(FS_RUNS)/$(1)-$(2)/model.pt: TEACH := pool lab
$(FS_RUNS)/$(1)-$(2)/model.pt: METHOD := $(1)
$(FS_RUNS)/$(1)-$(2)/model.pt: $(FS_CACHE)/lab-$(2).done $(FS_CACHE)/pool.done $(FS_DATA)/val-$(2)/manifest.json
$(FS_EVAL)/$(1)-$(2).json: EVAL_MIX := alpha= beta=
$(FS_EVAL)/$(1)-$(2).json: $(FS_RUNS)/$(1)-$(2)/model.pt $(FS_CACHE)/test.done
endef
$(foreach m,$(FS_BASELINES),$(foreach p,$(if $(filter kd,$(m)),$(FS_KD_PAIRS),$(FS_BASELINE_PAIRS)),$(eval $(call fewshot_baseline,$(m),$(p)))))

define fewshot_variant
$(FS_RUNS)/$(1)-$(2)/model.pt: PAIR := $(2)
$(FS_RUNS)/$(1)-$(2)/model.pt: SEED_S := $(lastword $(subst -s, ,$(2)))
$(FS_RUNS)/$(1)-$(2)/model.pt: TEACH := pool lab
$(FS_RUNS)/$(1)-$(2)/model.pt: VARIANT := $(1)
$(FS_RUNS)/$(1)-$(2)/model.pt: $(FS_CACHE)/lab-$(2).done $(FS_CACHE)/pool.done $(FS_DATA)/val-$(2)/manifest.json
$(FS_EVAL)/$(1)-$(2).json: $(FS_RUNS)/$(1)-$(2)/model.pt $(FS_CACHE)/test.done
endef
$(foreach v,$(FS_VARIANTS),$(foreach p,$(FS_BASELINE_PAIRS),$(eval $(call fewshot_variant,$(v),$(p)))))

# the unlabeled cache is the first word of TEACH, the labeled one the second; the labeled split's own cache
# name is lab-PAIR (zs) or lab-tipf-PAIR (fs)
$(FS_RUNS)/%/model.pt:
	@echo "== distill $* -> $(@D)"
	mkdir -p $(FS_RUNS)
	$(RECIPE) config $(FS_RECIPE) distill --out $(@D).distill.yaml $(if $(VARIANT),--variant $(VARIANT))
	$(FS_LAUNCH) distill --config $(@D).distill.yaml --out $(@D) --seed $(SEED_S) $(if $(METHOD),$(or $(FS_BASELINE_FLAGS_$(METHOD)),--method $(METHOD))) $(GRAD_COSINE_OPTS) \
	  --labeled $(FS_DATA)/lab-$(PAIR) --labeled-cache $(FS_CACHE)/$(word 2,$(TEACH))$(if $(filter lab,$(word 2,$(TEACH))),-$(PAIR)).zarr \
	  --unlabeled $(FS_DATA)/train --unlabeled-cache $(FS_CACHE)/$(word 1,$(TEACH)).zarr --val $(FS_DATA)/val-$(PAIR) \
	  $$(test -f $(@D)/checkpoints/last.pt && echo --resume)

$(FS_EVAL)/%.json:
	@echo "== evaluate $(FS_RUNS)/$* on $(FS_DATA)/test"
	mkdir -p $(@D)
	$(RECIPE) run $(FS_RECIPE) evaluate $(FS_EVAL_SET_$(firstword $(subst -, ,$*))) $(EVAL_MIX) -- \
	  $(DHO) evaluate $(FS_RUNS)/$* --data $(FS_DATA)/test --json > $@.tmp
	mv $@.tmp $@

$(FS_WORK)/table.md $(FS_WORK)/results.json &: $(foreach p,$(FS_PAIRS),$(FS_EVAL)/zs-$(p).json $(FS_EVAL)/fs-$(p).json $(FS_EVAL)/teacher-fs-$(p).json) \
  $(FS_BASELINE_RUNS:%=$(FS_EVAL)/%.json) $(FS_VARIANT_RUNS:%=$(FS_EVAL)/%.json) $(FS_EVAL)/teacher-zs.json
	@echo "== report -> $(FS_WORK)/table.md"
	$(PY) pipelines/fewshot/report.py --eval $(FS_EVAL) --recipe $(FS_RECIPE) --dataset $(FS_DATASET) \
	  --shots "$(SHOTS)" --seeds "$(SEEDS)" --baselines "$(FS_BASELINE_RUNS)" --variants "$(FS_VARIANT_RUNS)" --out $(FS_WORK)/table.md \
	  --json-out $(FS_WORK)/results.json $(if $(SMOKE),--smoke)

# =============================================================================================
# reproduce-fewshot-all: the few-shot benchmark over every dataset at once: each dataset by `make reproduce-fewshot`
# into FS_ALL_WORK/DATASET (resumable: a finished dataset costs one `make` that does nothing), then
# FS_ALL_WORK/table.md (the 10-dataset and 11-dataset averages beside the paper's, every dataset per K) and the
# figures FS_ALL_WORK/figures/*.png (Figs. 2 left, 4/13, 5, 6, 8; Figs. 11/12 with FS_RECIPE=coop-mobilenetv2.yaml).
#   make reproduce-fewshot-all ROOT=/data/coop [DATASETS="caltech101 ... ucf101 imagenet"] [SHOTS=..] [SEEDS=..] [GPUS=N]
#       [FS_RECIPE=pipelines/fewshot/coop-resnet18.yaml] [IMAGENET_RECIPE=pipelines/fewshot/resnet50-dino.yaml]
#       [LOG_GRAD_COSINE=N] [BASELINES=...] [FS_ALL_WORK=runs/fewshot-all]
#   make reproduce-fewshot-all SMOKE=1   # three generated datasets (two of the ten and ImageNet), SHOTS="1 2", SEEDS=1,
#                                        # the CE+KD baseline on every (K, seed), the diagnostics every step, on CPU
# ImageNet runs its own recipe (ResNet-50 DINO, as Figs. 2 and 8; resnet18-scratch.yaml for Table 14's ResNet-18).
# Cost: the sum of the datasets' reproduce-fewshot (see there); the report itself takes seconds.
# =============================================================================================
FS_TEN := caltech101 oxford_pets stanford_cars oxford_flowers food101 fgvc_aircraft sun397 dtd eurosat ucf101
ifdef SMOKE
DATASETS ?= oxford_pets eurosat imagenet
FS_ALL_WORK ?= runs/fewshot-all-smoke
IMAGENET_RECIPE ?= $(FS_RECIPE)
FS_ALL_SEEDS := $(if $(filter file,$(origin SEEDS)),1,$(SEEDS))
FS_ALL_BASELINES := $(if $(filter undefined,$(origin BASELINES)),ce+kd,$(BASELINES))
FS_ALL_GRAD := $(if $(filter undefined,$(origin LOG_GRAD_COSINE)),1,$(LOG_GRAD_COSINE))
else
DATASETS ?= $(FS_TEN) imagenet
FS_ALL_WORK ?= runs/fewshot-all
IMAGENET_RECIPE ?= pipelines/fewshot/resnet50-dino.yaml
FS_ALL_SEEDS := $(SEEDS)
FS_ALL_BASELINES := $(if $(filter undefined,$(origin BASELINES)),,$(BASELINES))
FS_ALL_GRAD := $(LOG_GRAD_COSINE)
endif
FS_ALL_RECIPE := $(FS_RECIPE)
FS_ALL_UNKNOWN := $(filter-out $(FS_TEN) imagenet,$(DATASETS))
ifneq ($(filter reproduce-fewshot-all,$(MAKECMDGOALS)),)
ifneq ($(FS_ALL_UNKNOWN),)
$(error DATASETS: $(FS_ALL_UNKNOWN) not of the CoOp benchmark; give some of: $(FS_TEN) imagenet)
endif
endif

reproduce-fewshot-all: setup
	@test -n "$(SMOKE)" -o -d "$(ROOT)" || { echo "error: give ROOT=FOLDER (CoOp's layout): make reproduce-fewshot-all ROOT=/data/coop"; exit 2; }
	@i=0; for d in $(DATASETS); do \
	  recipe=$$(test $$d = imagenet && echo $(IMAGENET_RECIPE) || echo $(FS_ALL_RECIPE)); \
	  echo "== dataset $$d ($$recipe) -> $(FS_ALL_WORK)/$$d"; \
	  $(MAKE) --no-print-directory reproduce-fewshot DATASET=$$d FS_WORK=$(FS_ALL_WORK)/$$d FS_RECIPE=$$recipe \
	    SHOTS="$(SHOTS)" SEEDS="$(FS_ALL_SEEDS)" $(if $(SMOKE),SMOKE_DATA_SEED=$$i SMOKE_BASELINE_PAIRS=all) \
	    $(if $(filter-out undefined,$(origin BASELINES))$(SMOKE),BASELINES="$(or $(FS_ALL_BASELINES),0)") \
	    $(if $(FS_ALL_GRAD),LOG_GRAD_COSINE=$(FS_ALL_GRAD)) || exit $$?; \
	  i=$$((i + 1)); \
	done
	@echo "== report -> $(FS_ALL_WORK)/table.md, $(FS_ALL_WORK)/figures"
	$(PY) pipelines/fewshot/report_all.py --work $(FS_ALL_WORK) --datasets "$(DATASETS)" --recipe $(FS_ALL_RECIPE) \
	  --imagenet-recipe $(IMAGENET_RECIPE) --out $(FS_ALL_WORK)/table.md --figures $(FS_ALL_WORK)/figures $(if $(SMOKE),--smoke)
