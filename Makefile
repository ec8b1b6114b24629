# make run   : set up .venv, then train the Table-1 net with flip+crop (tracked in ./mlflow.db)
# make test  : set up .venv, then run the test suite (CPU only)
# make bench : training speed of cifarx against a DataLoader baseline, side by side
# make docs  : build the documentation site into site/ (mkdocs serve: live, at 127.0.0.1:8000)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test bench ui docs constraints clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test,ray,bench,docs,robust]'
	touch $(STAMP)

run: install
	$(BIN)/cifarx train --arch table1 --aug flip,crop

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench/train_speed.py

ui: install
	$(BIN)/cifarx ui

docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

constraints: install
	{ sed -n '1,2p' constraints.txt; $(BIN)/pip freeze --exclude-editable | grep -v '^cifarx'; \
	  echo "setuptools==$$($(BIN)/python -c 'import setuptools; print(setuptools.__version__)')"; \
	} > constraints.tmp && mv constraints.tmp constraints.txt

clean:
	rm -rf $(VENV) build site *.egg-info framework/*.egg-info
