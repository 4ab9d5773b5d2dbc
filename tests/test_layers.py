"""The layers of the code: only the CLI's modules name its flags, and no import runs in a circle."""
import argparse
import ast
from pathlib import Path

from twistc import cli
from twistc.errors import TwistcError

ROOT = Path(__file__).resolve().parents[1]
CLI_MODULES = {"cli.py", "commands.py", "outdir.py", "__main__.py"}  # the command line and its output folder


def _flags() -> set[str]:
    flags = set()
    for action in cli._parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= {s for a in sub._actions for s in a.option_strings if s.startswith("--")}
    return flags - {"--help"}


def test_no_core_module_names_a_cli_flag():
    flags, found = _flags(), []
    assert {"--resume", "--latency-cache", "--target-speedup", "--atol"} <= flags
    for path in [*(ROOT / "twistc").rglob("*.py"), *(ROOT / "passes").glob("*.py")]:
        if path.name in CLI_MODULES:
            continue
        tree = ast.parse(path.read_text())
        docs = {id(n.body[0].value) for n in ast.walk(tree) if isinstance(
            n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and n.body and isinstance(n.body[0], ast.Expr)}
        for node in ast.walk(tree):  # messages and values, not docstrings
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                words = {w.strip("()[],;:'\"`") for w in node.value.split()}
                found += [f"{path.relative_to(ROOT)}:{node.lineno}: {w}" for w in words & flags]
    assert not found, "name the option (<option:NAME>, twistc.errors) instead:\n" + "\n".join(found)


def test_a_message_names_an_option_as_its_reader_sets_it():
    e = TwistcError("stopped; continue with <option:resume>")
    assert str(e) == "stopped; continue with resume=True"
    assert cli.spell_options(e.marked, cli.FLAGS) == "stopped; continue with --resume"


def _module_imports() -> dict[str, set[str]]:
    """Each twistc module -> the twistc modules it imports at load time (not inside functions, not for type
    checking only)."""
    files = {f"twistc.{'.'.join(p.relative_to(ROOT / 'twistc').with_suffix('').parts)}": p
             for p in (ROOT / "twistc").rglob("*.py")}
    files |= {f"twistc.passes.{p.stem}": p for p in (ROOT / "passes").glob("*.py")}
    files = {name.removesuffix(".__init__"): path for name, path in files.items()}
    graph = {}
    for name, path in files.items():
        found = set()
        for node in ast.parse(path.read_text()).body:  # top level only
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("twistc"):
                found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                          for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("twistc")}
        graph[name] = {m for m in found if m in files and m != name and m != "twistc"}
    return graph


def test_the_import_graph_has_no_cycles():
    graph, state, path = _module_imports(), {}, []

    def visit(name):
        state[name] = "open"
        path.append(name)
        for dep in sorted(graph[name]):
            assert state.get(dep) != "open", "import cycle: " + " -> ".join(path[path.index(dep):] + [dep])
            if dep not in state:
                visit(dep)
        path.pop()
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert "twistc.passes.lower" in graph["twistc.report"] and "twistc.report" not in graph["twistc.passes.lower"]
