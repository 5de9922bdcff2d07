"""Every public name is documented with its paper and listed in docs/api.md."""

import inspect
import pathlib

import pytest

import optax_subspace as osub
from optax_subspace import nn
from optax_subspace import projectors

API_PAGE = (pathlib.Path(__file__).parent.parent / "docs" / "api.md").read_text()
PUBLIC = [(n, getattr(osub, n)) for n in osub.__all__ if n != "projectors"] + [
    (n, getattr(projectors, n)) for n in projectors.__all__
] + [(n, getattr(nn, n)) for n in nn.__all__]
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
    assert "METHODS.md" in doc
    return
  for section in ("References:", "Args:", "Returns:", "Example:"):
    assert section in doc, f"{name}: no '{section}' section"
  assert "arXiv" in doc, f"{name}: no paper reference"
