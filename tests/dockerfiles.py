"""Reading docker/*.Dockerfile in tests: instructions per build stage, as Docker reads them
(comment lines dropped, backslash continuations joined)."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCKER_DIR = REPO / "docker"


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, COPY, RUN, ...
    args: str
    stage: int  # 0 for the first FROM's stage, counting up
    line: int

    def exec_form(self) -> list[str]:
        """["a", "b"] of an exec-form ENTRYPOINT/CMD."""
        value = json.loads(self.args)
        assert isinstance(value, list), f"line {self.line}: {self.keyword} is not in exec form"
        return value

    def copy_sources(self) -> tuple[list[str], str, dict[str, str]]:
        """(sources, destination, --flags) of a COPY or ADD."""
        words = shlex.split(self.args)
        flags = {w[2:].split("=", 1)[0]: w.split("=", 1)[-1] for w in words if w.startswith("--")}
        paths = [w for w in words if not w.startswith("--")]
        return paths[:-1], paths[-1], flags


def dockerfiles() -> list[Path]:
    return sorted(DOCKER_DIR.glob("*.Dockerfile"))


def instructions(path: Path) -> list[Instruction]:
    out: list[Instruction] = []
    stage = -1
    pending, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # Docker drops comment lines inside a continued instruction too
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = pending + line
        pending = ""
        keyword, _, args = text.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        out.append(Instruction(keyword, args.strip(), stage, start))
    return out


def final_stage(path: Path) -> list[Instruction]:
    found = instructions(path)
    last = max(i.stage for i in found)
    return [i for i in found if i.stage == last]


def last(path: Path, keyword: str) -> Instruction | None:
    """The instruction that takes effect in the image (the final stage's last one)."""
    matches = [i for i in final_stage(path) if i.keyword == keyword]
    return matches[-1] if matches else None
