"""What `keel launch` (keel/launch/pytorchjob.py) and `keel deploy` (keel/launch/deploy.py) share about
Kubernetes objects: valid names, Keel's labels, the YAML they print, and `kubectl apply`.

Plain dicts, no Kubernetes client: rendering must work on a laptop with nothing installed
but Keel, and the tests check the dicts against the real schemas and SDK models.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

from data.errors import KeelError

# The non-root uid every Keel image runs as (USER in docker/*.Dockerfile); pods name it in
# their securityContext so runAsNonRoot can be checked by the kubelet.
IMAGE_UID = 10001

_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")


def check_name(name: str, *, flag: str, longest_suffix: str = "") -> str:
    """A DNS-1035 label; pods and Services are named NAME + suffix and must stay within 63 characters."""
    limit = 63 - len(longest_suffix)
    if not _DNS_LABEL.match(name) or len(name) > limit:
        raise KeelError(f"{flag} {name!r}: expected lowercase letters, digits and '-', starting with a letter, "
                        f"at most {limit} characters (Kubernetes names pods and Services after it)")
    return name


def is_object_name(value: str) -> bool:
    return bool(_DNS_SUBDOMAIN.match(value)) and len(value) <= 253


def check_object_name(value: str, flag: str) -> str:
    """The name of an object the cluster already has (a claim, a Secret, a LocalQueue, a PriorityClass)."""
    if not is_object_name(value):
        raise KeelError(f"{flag} {value!r}: expected the name of a Kubernetes object (lowercase letters, "
                        "digits, '-' and '.')")
    return value


# [HOST[:PORT]/]PATH[:TAG][@sha256:DIGEST], as the container runtimes read an image reference
_IMAGE = re.compile(r"^(?:[A-Za-z0-9.-]+(?::[0-9]+)?/)?[a-z0-9]+(?:[._-]+[a-z0-9]+)*(?:/[a-z0-9]+(?:[._-]+[a-z0-9]+)*)*"
                    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[a-f0-9]{64})?$")


def check_image(image: str, flag: str = "--image", example: str = "registry.example/keel-train:0.1.0") -> str:
    """An image reference (no scheme, no credentials: the pods pull with the cluster's pull secrets)."""
    if not _IMAGE.match(image or ""):
        raise KeelError(f"{flag} {image!r}: expected an image reference such as {example} (no scheme, no spaces, "
                        "no credentials: give the cluster an imagePullSecret instead)")
    return image


def check_quantity(value: str, flag: str) -> str:
    if not _QUANTITY.match(value):
        raise KeelError(f"{flag} {value!r}: expected a Kubernetes quantity such as 4, 500m, 64Gi or 1Ti")
    return value


def name_from(text: str) -> str:
    """A default object name from a file or model name: sft-tool-calling.yaml -> sft-tool-calling."""
    name = re.sub(r"[^a-z0-9]+", "-", Path(text).stem.lower()).strip("-")
    if not name or not name[0].isalpha():
        name = f"keel-{name}".rstrip("-")
    return name[:40].rstrip("-")


def labels(instance: str, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "keel", "app.kubernetes.io/instance": instance,
            "app.kubernetes.io/component": component}


def metadata(name: str, namespace: str | None, *, instance: str, component: str, extra: dict | None = None) -> dict:
    meta: dict = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    meta["labels"] = {**labels(instance, component), **(extra or {})}
    return meta


class _ManifestDumper(yaml.SafeDumper):
    """Readable manifests: no &anchors for repeated dicts, multi-line text (a recipe) as a | block."""

    def ignore_aliases(self, data):
        return True


def _str(dumper: yaml.SafeDumper, value: str):
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_ManifestDumper.add_representer(str, _str)


def dump_yaml(docs: list[dict]) -> str:
    return yaml.dump_all(docs, Dumper=_ManifestDumper, sort_keys=False, width=120)


def kubectl_apply(text: str, *, flag_hint: str) -> int:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise KeelError("--apply runs `kubectl apply -f -`, but kubectl is not on PATH; install kubectl, or leave "
                        f"out --apply and apply the printed YAML elsewhere: {flag_hint} > manifests.yaml")
    return subprocess.run([kubectl, "apply", "-f", "-"], input=text, text=True).returncode
