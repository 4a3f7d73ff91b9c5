"""The layering of docs/architecture.md, as import-linter's contracts in pyproject.toml state it:
data <- trainer, serving (never each other) <- keel, and no import cycles inside any package.
Imports placed inside functions count like any other."""

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_import_contracts_are_kept():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    proc = subprocess.run([lint, "--no-cache"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_the_readme_is_a_front_door_and_the_reference_lives_in_docs():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250
    for page in ("architecture", "recipes", "data", "formats", "training", "serving", "kubernetes", "operations",
                 "planner", "testing", "SECURITY", "slurm", "sagemaker"):
        assert (REPO / "docs" / f"{page}.md").is_file(), page
        assert f"docs/{page}.md" in readme, f"README does not link docs/{page}.md"


def test_product_code_and_docs_cite_nothing_outside_the_repository():
    """A newcomer's clone has no ../shared: a path there is a dead end in a docstring or a page."""
    roots = ["keel", "trainer", "serving", "data", "docs", "recipes", "docker", "README.md", "benchmarks/README.md"]
    offenders = []
    for root in roots:
        path = REPO / root
        for f in [path] if path.is_file() else sorted(path.rglob("*")):
            if f.is_file() and f.suffix in {".py", ".md", ".yaml", ".jinja", ".txt", ".Dockerfile", ""}:
                text = f.read_text(encoding="utf-8", errors="replace")
                if "../shared" in text or "/work/" in text:
                    offenders.append(str(f.relative_to(REPO)))
    assert offenders == []


def test_test_modules_have_unique_names():
    """pytest imports test files by their base name (the test folders are not packages), so two
    test_x.py in different folders stop the whole run at collection: name each file once."""
    tests = Path(__file__).resolve().parents[1]
    seen: dict[str, Path] = {}
    for path in sorted(tests.rglob("test_*.py")):
        assert path.name not in seen, f"{path} and {seen[path.name]} share a module name; rename one"
        seen[path.name] = path
