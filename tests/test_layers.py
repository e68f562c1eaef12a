"""Layers point one way (STYLE 17): the stages (grpo/, sft/) import the shared layers (infra/,
rewards/, kernels/, data/) and never each other; the shared layers import no stage; the
pipeline runner sits above both. Read from the source: every `import` and `from ... import`,
at any depth (a hidden import inside a function counts)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BELOW = ("infra", "rewards", "kernels", "data")
STAGES = ("grpo", "sft")


def _imports(path: Path) -> set[str]:
    """Top-level package of every module `path` imports."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", BELOW)
def test_the_shared_layers_import_no_stage(package):
    offending = {str(p.relative_to(ROOT)): sorted(_imports(p) & {*STAGES, "pipeline"})
                 for p in _modules(package)}
    assert not {k: v for k, v in offending.items() if v}


def test_the_stages_do_not_import_each_other():
    for stage, other in (("grpo", "sft"), ("sft", "grpo")):
        offending = [str(p.relative_to(ROOT)) for p in _modules(stage) if other in _imports(p)]
        assert not offending, f"{stage} imports {other}: {offending}"
    assert not any("pipeline" in _imports(p) for s in STAGES for p in _modules(s))


def test_the_check_itself_sees_a_hidden_import(tmp_path):
    # A control: an import inside a function is found, as is a dotted one.
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from grpo.trainer import GRPOTrainer\n    import sft.packing\n")
    assert _imports(f) == {"grpo", "sft"}
