"""The house rules a newcomer relies on, checked from the code itself: pipeline/ has no import
circle (deferred imports inside functions count), no room of it holds more than 10 modules, no
stage imports another stage, and the README's stage table lists every registered kind."""
import ast
import graphlib
import re

from conftest import REPO

from pipeline.core import registry


def _modules(package: str) -> dict[str, ast.Module]:
    out = {}
    for f in (REPO / package).rglob("*.py"):
        parts = f.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(f.read_text())
    return out


def _imports(tree: ast.Module, known: dict) -> set[str]:
    """Project modules ``tree`` imports anywhere in it (``from a.b import c`` is a.b.c if that is a module)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {m for m in found if m in known}


def test_pipeline_has_no_import_circle():
    mods = _modules("pipeline")
    graph = {name: {m for m in _imports(tree, mods) if m != name and not name.startswith(f"{m}.")}
             for name, tree in mods.items()}
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as e:
        raise AssertionError(f"import circle: {' <- '.join(e.args[1])}") from None


def test_no_room_of_pipeline_holds_more_than_10_modules():
    for folder in [REPO / "pipeline", *(p for p in (REPO / "pipeline").rglob("*") if p.is_dir())]:
        modules = [f.name for f in folder.glob("*.py") if f.name not in ("__init__.py", "__main__.py")]
        assert len(modules) <= 10, f"{folder.relative_to(REPO)}: {len(modules)} modules: {sorted(modules)}"


def test_no_stage_imports_another_stage():
    mods = _modules("stages")
    stage_modules = {m for m in mods if m.count(".") == 1 and not m.startswith("stages.common")}
    for name in stage_modules:
        others = {m for m in _imports(mods[name], mods) if m in stage_modules and m != name}
        assert not others, f"{name} imports {sorted(others)}"


def test_readme_stage_table_lists_every_registered_kind():
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Stages\n", 1)[1].split("\n## ", 1)[0]  # the table under "## Stages"
    table = set(re.findall(r"^\| `([a-z_]+)` \|", section, re.M))
    assert set(registry.kinds()) <= table, f"missing from the README's stage table: {set(registry.kinds()) - table}"


def test_no_function_is_over_60_lines():
    long = []
    for package in ("pipeline", "stages"):
        for f in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                    long.append(f"{f.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert not long, "functions over 60 lines:\n" + "\n".join(long)


def test_conditional_writes_go_through_one_primitive():
    """Create-if-absent and compare-and-swap are written once, in pipeline/store/conditional.py:
    commits, leases and promotion call it, and no other module speaks If-None-Match, If-Match or
    link() itself."""
    spelled = re.compile(r'mode="create"|IfMatch|os\.link\(|O_EXCL|fcntl\.flock')
    where = [f"{f.relative_to(REPO)}" for package in ("pipeline", "stages") for f in sorted((REPO / package).rglob("*.py"))
             if f.name != "conditional.py" and spelled.search(f.read_text())]
    assert not where, f"conditional writes spelt outside pipeline/store/conditional.py: {where}"


def test_a_stage_cache_key_covers_the_programs_its_helpers_ship(tmp_path, monkeypatch):
    """The sandbox's programs are package data, not modules: verify's code version still changes
    when one of them does."""
    from stages.common import sandbox
    from stages.verify import Verify

    assert sandbox.CODE_FILES and all(f.endswith(".py") for f in sandbox.CODE_FILES)
    before = Verify.code_version()
    program = tmp_path / "wrapper.py"
    program.write_text(open(sandbox.CODE_FILES[-1]).read() + "\n# edited\n")
    monkeypatch.setattr(sandbox, "CODE_FILES", [*sandbox.CODE_FILES[:-1], str(program)])
    assert Verify.code_version() != before
