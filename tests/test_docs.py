"""Every public name is documented with its paper and listed in docs/api.md."""

import importlib
import importlib.util
import inspect
import pathlib
import re

import pytest

import optax_subspace as osub
from optax_subspace import nn
from optax_subspace import projectors

API_PAGE = (pathlib.Path(__file__).parent.parent / "docs" / "api.md").read_text()
PUBLIC = (
  [(n, getattr(osub, n)) for n in osub.__all__ if n != "projectors"]
  + [(n, getattr(projectors, n)) for n in projectors.__all__]
  + [(n, getattr(nn, n)) for n in nn.__all__]
)
FUNCTIONS = [(n, obj) for n, obj in PUBLIC if inspect.isfunction(obj)]


@pytest.mark.parametrize("name,obj", PUBLIC, ids=[n for n, _ in PUBLIC])
def test_public_name_is_in_the_api_page_and_documented(name, obj):
  assert f"`{name}" in API_PAGE, f"{name} missing from docs/api.md"
  if inspect.isfunction(obj) or inspect.isclass(obj):
    assert (obj.__doc__ or "").strip(), f"{name} has no docstring"


@pytest.mark.parametrize("name,obj", FUNCTIONS, ids=[n for n, _ in FUNCTIONS])
def test_public_function_docstring_has_references_args_and_example(name, obj):
  doc = obj.__doc__
  if name == "online_pca_gradient":  # a formula, referenced by online_pca
    assert "docs/methods.md" in doc
    return
  for section in ("References:", "Args:", "Returns:", "Example:"):
    assert section in doc, f"{name}: no '{section}' section"
  assert "arXiv" in doc, f"{name}: no paper reference"


REPO = pathlib.Path(__file__).resolve().parent.parent
# Background notes that live outside the repository, and machine paths: nothing here may send a
# reader to them. (Written with character classes, so that grepping the repository for those
# names does not find this line.)
OUTSIDE = re.compile(r"share[d]/|\b(METHOD[S]|DESIG[N]|TARGET[S])\.md|/roo[t]/|/hom[e]/|/wor[k]/")
TEXT_FILES = sorted(
  p
  for pattern in (
    "*.md",
    "docs/**/*.md",
    "examples/**/*.md",
    "examples/**/*.py",
    "optax_subspace/**/*.py",
    "benchmarks/*.py",
    "benchmarks/results/**/*.json",
    "benchmarks/results/**/*.md",
    "tests/**/*.py",
  )
  for p in REPO.glob(pattern)
  if p.resolve() != pathlib.Path(__file__).resolve()
)
# A repository file named in a doc: `docs/x.md`, [text](path), `examples/llama/README.md`.
DOC_PATH = re.compile(r"`((?:docs|examples|benchmarks|tests|optax_subspace)/[\w./-]+\.\w+)`")
LINK = re.compile(r"\]\(([^)#\s]+)\)")


@pytest.mark.parametrize("path", TEXT_FILES, ids=[str(p.relative_to(REPO)) for p in TEXT_FILES])
def test_text_points_only_inside_the_repository(path):
  for number, line in enumerate(path.read_text().splitlines(), 1):
    assert not OUTSIDE.search(line), f"{path.relative_to(REPO)}:{number}: {line.strip()}"


DOCS = sorted([*REPO.glob("*.md"), *REPO.glob("docs/*.md"), *REPO.glob("examples/**/*.md")])


@pytest.mark.parametrize("path", DOCS, ids=[str(p.relative_to(REPO)) for p in DOCS])
def test_files_a_doc_names_exist(path):
  text = path.read_text()
  for name in DOC_PATH.findall(text):
    assert (REPO / name).exists(), f"{path.relative_to(REPO)} names {name}, which does not exist"
  for target in LINK.findall(text):
    if "://" in target or target.startswith("mailto:"):
      continue
    assert (path.parent / target).resolve().exists(), (
      f"{path.relative_to(REPO)} links {target}, which does not exist"
    )


INSTALL = re.compile(r"pip install -e \S+ && pip install --no-deps [\w.=\- ]+?(?= &&|\n)")


def test_both_readmes_give_the_same_install_command():
  commands = [
    INSTALL.findall((REPO / name).read_text()) for name in ("README.md", "examples/llama/README.md")
  ]
  assert commands[0] and commands[0] == commands[1], commands


def test_the_generated_reference_page_lists_every_public_name_from_its_module():
  spec = importlib.util.spec_from_file_location("_reference_hook", REPO / "docs/_reference_hook.py")
  hook = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(hook)
  for package in (osub, projectors, nn):
    listed = hook.public_names(package.__name__)
    assert [name for name, _ in listed] == list(package.__all__)
    for name, module in listed:
      assert getattr(importlib.import_module(module), name) is getattr(package, name), name
