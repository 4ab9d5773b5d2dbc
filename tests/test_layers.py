"""The core speaks the Python API: only the CLI's modules name its flags."""
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
