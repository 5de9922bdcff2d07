"""MkDocs hook: writes the API reference page's directives from the packages' `__all__`.

docs/reference.md holds one marker per package; each becomes one mkdocstrings directive per
public name, pointing at the module that defines it (read from the package's imports, without
importing anything). A name the package re-exports from a module of the same name
(`projectors.svd` is the function of `projectors/svd.py`) is thereby the function, not the module.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
MARKER = "<!-- public names of "


def public_names(package: str) -> list[tuple[str, str]]:
  """(name, defining module) for every name in `package.__all__`, in `__all__`'s order."""
  init = ROOT / package.replace(".", "/") / "__init__.py"
  tree = ast.parse(init.read_text())
  source, names = {}, []
  for node in tree.body:
    if isinstance(node, ast.ImportFrom) and node.module:
      for alias in node.names:
        source[alias.asname or alias.name] = node.module
    elif isinstance(node, ast.Assign) and any(
      isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
    ):
      names = ast.literal_eval(node.value)
  return [(name, source.get(name, package)) for name in names]


def directives(package: str) -> str:
  blocks = []
  for name, module in public_names(package):
    if module == package and (ROOT / package.replace(".", "/") / name).is_dir():
      continue  # a subpackage (optax_subspace.projectors) has its own section
    blocks.append(f"::: {module}.{name}\n    options:\n      show_root_full_path: false\n")
  return "\n".join(blocks)


def on_page_markdown(markdown, page, **kwargs):
  if page.file.src_path != "reference.md":
    return markdown
  lines = []
  for line in markdown.splitlines():
    if line.startswith(MARKER):
      lines.append(directives(line[len(MARKER) :].split()[0]))
    else:
      lines.append(line)
  return "\n".join(lines) + "\n"
