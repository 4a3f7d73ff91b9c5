"""What a run records about itself besides the recipe: the installed packages, the git commits of
Keel and of the recipe's project, with secrets kept out of everything that reaches MLflow.

Secrets can hide in a recipe (a tracking URI or data URL with user:password@, a key named
*token*/*secret*/*password*) and in URLs of installed packages (pip freeze's VCS URLs). Keel
logs no environment variables, so tokens in the environment (HF_TOKEN, AWS_SECRET_ACCESS_KEY,
MLFLOW_TRACKING_PASSWORD) never reach MLflow; the hidden values are replaced by REDACTED.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

from data.redaction import REDACTED, SECRET_NAME as SECRET_KEY, redact_text


def redact(value: Any, key: str = "") -> Any:
    """A copy of a (nested) recipe dict with secret-named keys and URL credentials hidden."""
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if isinstance(value, str):
        return REDACTED if value and SECRET_KEY.search(key.rsplit(".", 1)[-1]) else redact_text(value)
    return value


def installed_packages() -> str:
    """`pip freeze` of this interpreter (name==version, sorted), without calling pip."""
    from importlib.metadata import distributions

    seen = {}
    for dist in distributions():
        name = dist.metadata["Name"]
        if name and name.lower() not in seen:
            seen[name.lower()] = f"{name}=={dist.version}"
    return "".join(line + "\n" for _, line in sorted(seen.items()))


def git_commit(directory: Path) -> str | None:
    """HEAD of the git work tree holding `directory`, with "-dirty" when it has uncommitted
    changes; None outside a work tree or without git."""
    try:
        head = subprocess.run(["git", "-C", str(directory), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(directory), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def run_environment(recipe_file: str | None) -> tuple[dict[str, str], dict[str, str]]:
    """(artifacts, tags): environment/requirements.txt and environment/git.txt; the commits as tags."""
    import platform
    import sys

    keel_src = Path(__file__).resolve().parents[1]
    commits = {"keel.git_commit": git_commit(keel_src)}
    if recipe_file:
        commits["recipe.git_commit"] = git_commit(Path(recipe_file).resolve().parent)
    tags = {k: v for k, v in commits.items() if v}
    git = "".join(f"{k}: {v or 'not in a git work tree'}\n" for k, v in commits.items())
    artifacts = {
        "environment/requirements.txt": redact_text(installed_packages()),
        "environment/git.txt": git,
        "environment/python.txt": f"{sys.version}\n{platform.platform()}\n",
    }
    return artifacts, tags
