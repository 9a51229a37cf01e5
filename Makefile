# Two commands on a fresh clone: `make run` (set up + main job) and `make test`.
PY      := .venv/bin/python
RECSYS  := .venv/bin/recsys
DATA    := data/ml100k-ctr
CONFIG  := configs/movielens/base.yaml
RUN     := runs/movielens/base/make_run
STAMP   := .venv/.installed

.PHONY: setup data run test lint bench compare clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup_venv.sh
	bash scripts/setup_venv.sh

data: $(DATA)/PREPARED.json

$(DATA)/PREPARED.json: $(STAMP) datasets/movielens/prepare.py
	$(PY) datasets/movielens/prepare.py --out $(DATA) --force

$(RUN)/checkpoints/best.ckpt: $(DATA)/PREPARED.json $(CONFIG)
	rm -rf $(RUN)
	$(RECSYS) fit --config $(CONFIG) --trainer.logger.init_args.version make_run

$(RUN)/eval_test/report.json: $(RUN)/checkpoints/best.ckpt
	$(RECSYS) eval --ckpt $< --out $(RUN)/eval_test

## run: set up, prepare MovieLens-100k, train the base model, evaluate the test split
run: $(RUN)/eval_test/report.json
	@$(PY) scripts/show_report.py $(RUN)

## test: set up if needed, then the test suite
test: $(STAMP) $(DATA)/PREPARED.json
	$(PY) -m pytest -q

## lint: ruff's rules (lines ≤ 120) and its formatting
lint: $(STAMP)
	.venv/bin/ruff check recsys tests scripts datasets
	.venv/bin/ruff format --check recsys tests scripts datasets

bench: $(STAMP) $(DATA)/PREPARED.json
	$(PY) scripts/bench_train.py --configs configs/movielens/din.yaml configs/movielens/base.yaml
	$(PY) scripts/profile_train_step.py --config configs/movielens/din.yaml

compare: $(STAMP) $(DATA)/PREPARED.json
	$(PY) scripts/compare_models.py --seeds 1 2 3 --configs \
		$(foreach m,base din bst deepfm dcnv2 finalmlp dlrm,configs/movielens/$(m).yaml)

clean:
	rm -rf runs lightning_logs .pytest_cache
