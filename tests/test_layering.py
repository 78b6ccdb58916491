"""The package layering the design fixes, read statically (ast, no imports run): quasar_model
imports nothing of ours, eval and distill do not import each other (what both roles need lives in
quasar_model) nor neurons (which composes them). Imports inside functions count, and so do
`importlib.import_module("...")` calls with a literal name: they are links all the same."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _imported_packages(path: Path) -> set[str]:
    """Top-level package of every absolute import in the file, at any depth of the syntax tree."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
        elif (isinstance(node, ast.Call) and _called_name(node.func) in ("import_module", "__import__")
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and not node.args[0].value.startswith(".")):
            out.add(node.args[0].value.split(".")[0])
    return out


def _called_name(func: ast.expr) -> str | None:
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None


def _violations(package: str, forbidden: set[str]) -> list[str]:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no modules under {package}/"
    return [f"{f.relative_to(ROOT)} imports {sorted(_imported_packages(f) & forbidden)}"
            for f in files if _imported_packages(f) & forbidden]


@pytest.mark.parametrize("package, forbidden", [
    ("quasar_model", {"distill", "eval", "neurons"}),
    ("eval", {"distill", "neurons"}),
    ("distill", {"eval", "neurons"}),
])
def test_packages_import_only_downwards(package, forbidden):
    assert _violations(package, forbidden) == []


def test_the_scan_sees_imports_inside_functions(tmp_path):
    mod = tmp_path / "m.py"
    mod.write_text("def f():\n    from distill.losses import chunked_kd_loss\n    import neurons.cli\n"
                   "    class C:\n        def g(self):\n            importlib.import_module('eval.cli')\n"
                   "            import_module('.sibling', __package__)\n")
    assert _imported_packages(mod) == {"distill", "neurons", "eval"}


def _python(code: str) -> str:
    """stdout of `code` in a fresh interpreter (what a module imports at first is per process)."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_light_modules_import_without_torch():
    """Loading a competition or reading a config file must not pay for torch and transformers
    (`import quasar_model` once imported the model, ~3 s of a competition load)."""
    code = ("import sys, quasar_model, quasar_model.files, quasar_model.paths, eval.competition, "
            "quasar_model.teacher_outputs; eval.competition.load_competition('localnet'); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    assert _python(code) == "[]"


def test_the_model_names_load_and_register_on_first_use():
    code = ("import quasar_model; from transformers import AutoConfig; "
            "assert quasar_model.QuasarLongConfig.model_type == 'quasar_long'; "
            "print(type(AutoConfig.for_model('quasar_long')).__name__)")
    assert _python(code) == "QuasarLongConfig"


def test_the_first_load_from_several_threads_at_once():
    """The validator checks submissions in worker threads: the lazy load must not race transformers'
    own lazy imports (without quasar_model's lock this fails with a half-initialised module)."""
    code = ("import threading, quasar_model\n"
            "errors = []\n"
            "def load(name):\n"
            "    try:\n"
            "        quasar_model.register() if name == 'register' else getattr(quasar_model, name)\n"
            "    except Exception as e:\n"
            "        errors.append(repr(e))\n"
            "names = ['QuasarLongConfig', 'QuasarLongForCausalLM', 'register'] * 2\n"
            "threads = [threading.Thread(target=load, args=(n,)) for n in names]\n"
            "[t.start() for t in threads]; [t.join() for t in threads]\n"
            "print(errors)\n")
    assert _python(code) == "[]"
