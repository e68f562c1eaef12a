"""Layers point one way (STYLE 17): the stages (grpo/, sft/) import the shared layers (run/,
model/, evaluate.py, rewards/, kernels/, data/, tools/) and never each other; the shared layers import
no stage; the pipeline runner sits above both. And one package, named once (STYLE 18): every
import of the project's own code names `r1train` (absolute), so a file read alone says where
each name comes from. Read from the source: every `import` and `from ... import`, at any depth
(a hidden import inside a function counts)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "r1train"
BELOW = ("run", "model", "evaluate", "rewards", "kernels", "data", "tools")
STAGES = ("grpo", "sft")
# The top-level names the project had before it was one package: none may be imported any more.
OLD_NAMES = {"grpo", "sft", "kernels", "data", "infra", "rewards", "pipeline", "train"}


def _imports(path: Path) -> set[str]:
    """The part of r1train (its subpackage or top module) of every project module `path` imports."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] if node.module != "r1train" else [f"r1train.{a.name}" for a in node.names]
        out |= {n.split(".")[1] for n in names if n.startswith("r1train.")}
    return out


def _modules(part: str) -> list[Path]:
    return sorted((PACKAGE / part).rglob("*.py")) if (PACKAGE / part).is_dir() else [PACKAGE / f"{part}.py"]


def _python_files() -> list[Path]:
    return [p for d in ("r1train", "tests", "bench") for p in sorted((ROOT / d).rglob("*.py"))] + [ROOT / "train.py"]


@pytest.mark.parametrize("part", BELOW)
def test_the_shared_layers_import_no_stage(part):
    assert _modules(part) and all(p.exists() for p in _modules(part))
    offending = {str(p.relative_to(ROOT)): sorted(_imports(p) & {*STAGES, "pipeline", "cli"})
                 for p in _modules(part)}
    assert not {k: v for k, v in offending.items() if v}


def test_the_stages_do_not_import_each_other():
    for stage, other in (("grpo", "sft"), ("sft", "grpo")):
        offending = [str(p.relative_to(ROOT)) for p in _modules(stage) if other in _imports(p)]
        assert not offending, f"{stage} imports {other}: {offending}"
    assert not any({"pipeline", "cli"} & _imports(p) for s in STAGES for p in _modules(s))


def test_every_project_import_is_absolute_under_r1train():
    offending = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                offending.append(f"{path.relative_to(ROOT)}:{node.lineno}: relative import")
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            offending += [f"{path.relative_to(ROOT)}:{node.lineno}: import {n}" for n in names
                          if n.split(".")[0] in OLD_NAMES]
    assert not offending


def test_the_check_itself_sees_a_hidden_import(tmp_path):
    # A control: an import inside a function is found, as are a dotted one and a subpackage
    # imported from the package itself.
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from r1train.grpo.trainer import GRPOTrainer\n    import r1train.sft.packing\n"
                 "    from r1train import pipeline\n")
    assert _imports(f) == {"grpo", "sft", "pipeline"}
