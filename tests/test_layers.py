"""The package's layering (pyproject's import-linter contracts) holds, and it can fail."""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lint(config: Path, cwd: Path, pythonpath: Path | None = None):
    env = {"PATH": str(Path(sys.executable).parent), "HOME": str(cwd)}
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    code = ("import sys; from importlinter.cli import lint_imports; "
            "sys.exit(lint_imports(sys.argv[1], no_cache=True))")
    return subprocess.run([sys.executable, "-c", code, str(config)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=120)


def test_relpos_layers_are_kept():
    r = lint(ROOT / "pyproject.toml", ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "3 kept, 0 broken" in r.stdout


def test_a_cycle_through_a_function_level_import_breaks_the_contract(tmp_path):
    pkg = tmp_path / "src" / "toy"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text(textwrap.dedent("""
        def f():
            from toy import high  # hidden back-edge
            return high
    """))
    (pkg / "high.py").write_text("from toy import low\n")
    cfg = tmp_path / "contracts.toml"
    cfg.write_text(textwrap.dedent("""
        [tool.importlinter]
        root_package = "toy"
        [[tool.importlinter.contracts]]
        name = "toy layers"
        type = "layers"
        layers = ["toy.high", "toy.low"]
        [[tool.importlinter.contracts]]
        name = "toy acyclic"
        type = "acyclic_siblings"
        ancestors = ["toy"]
    """))
    r = lint(cfg, tmp_path, tmp_path / "src")
    assert r.returncode != 0
    assert "toy layers BROKEN" in r.stdout and "toy acyclic BROKEN" in r.stdout


def test_relpos_plot_does_not_load_jax():
    code = "import sys, relpos.cli.plot; print('jax' in sys.modules, 'flax' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False"]
