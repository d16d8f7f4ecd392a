"""The package's layers (pipeline/__init__.py): each module imports only from its own layer and
the layers before it, function-level imports included. A new upward arrow fails here, naming
the module and what it imports."""

import ast
from pathlib import Path

from tests.helpers import ROOT

# In order: a module may import from its own layer and those before it.
LAYERS = [
    {"errors"},
    {"model", "data"},
    {"config"},
    {"flops", "tracking"},
    {"train"},
    {"plan"},
    {"evaluate", "dryrun", "serving", "cli", "config_doc"},
]


def layer_of(part: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if part in names)


def imports(path: Path) -> set[str]:
    """The pipeline's top-level parts (``model``, ``train``, ...) that ``path`` imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
            [a.name for a in node.names] if isinstance(node, ast.Import) else []
        found |= {name.split(".")[1] for name in names if name.startswith("pipeline.")}
    return found


def test_every_import_points_to_its_own_layer_or_an_earlier_one():
    package = ROOT / "pipeline"
    modules = [p for p in package.rglob("*.py") if p.name != "__init__.py" or p.parent != package]
    assert len(modules) > 25
    upward = []
    for path in modules:
        part = path.relative_to(package).parts[0].removesuffix(".py")
        upward += [f"{path.relative_to(ROOT)} imports pipeline.{target}" for target in imports(path)
                   if layer_of(target) > layer_of(part)]
    assert not upward, "\n".join(upward)


def test_nothing_under_train_imports_a_stage():
    stages = LAYERS[-1]
    offending = [str(p.relative_to(ROOT)) for p in (ROOT / "pipeline/train").rglob("*.py") if imports(p) & stages]
    assert not offending
