"""Cluster specs checked against the schemas their tools publish, offline.

- ``ray up`` YAMLs: Ray's own ``ray-schema.json`` (shipped inside the ``ray`` package, found
  without importing Ray), plus the two checks Ray's ``validate_config`` adds to it.
- KubeRay manifests: the ``openAPIV3Schema`` of KubeRay v1.7.0's CRDs, vendored in
  ``cluster/schemas/kuberay-v1.7.0/``, read as JSON Schema the way the API server reads it:
  ``x-kubernetes-int-or-string`` accepts an int or a string, ``nullable`` admits null, and an
  object with declared properties refuses unknown ones (``kubectl apply`` validates strictly).
  ``x-kubernetes-validations`` (CEL rules) are not evaluated.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from runtime.cluster._jobs import project_root
from runtime.errors import ConfigError, DependencyError

KUBERAY_SCHEMAS = Path("cluster") / "schemas" / "kuberay-v1.7.0"  # relative to the project root
KUBERAY_CRDS = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
_SUBSCHEMAS = ("items", "additionalProperties", "not", "anyOf", "allOf", "oneOf")


def _check(validator: Any, doc: Any, what: str) -> None:
    errors = sorted(validator.iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path])
    if not errors:
        return
    lines = []
    for error in errors[:10]:
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".")
        lines.append(f"  {path or '<top>'}: {error.message}")
    more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
    raise ConfigError(f"{what}:\n" + "\n".join(lines) + more)


@lru_cache(maxsize=1)
def ray_schema() -> dict[str, Any]:
    """``ray/autoscaler/ray-schema.json`` of the installed Ray."""
    spec = importlib.util.find_spec("ray")
    if spec is None or spec.origin is None:
        raise DependencyError("the ray package is not installed: pip install -c constraints.txt -e .")
    data: dict[str, Any] = json.loads((Path(spec.origin).parent / "autoscaler" / "ray-schema.json").read_text("utf-8"))
    return data


def validate_ray_up(doc: Mapping[str, Any]) -> None:
    """A ``ray up`` config against Ray's schema, its head node type and its worker bounds."""
    import jsonschema

    schema = ray_schema()
    name = doc.get("cluster_name", "?")
    _check(jsonschema.validators.validator_for(schema)(schema), doc, f"ray up config {name!r} breaks ray-schema.json")
    types = doc.get("available_node_types") or {}
    if doc.get("head_node_type") not in types:
        raise ConfigError(f"ray up config {name!r}: head_node_type {doc.get('head_node_type')!r} is not a node type")
    min_sum = sum(t.get("min_workers", 0) for t in types.values())
    if min_sum > doc.get("max_workers", 0):
        raise ConfigError(f"ray up config {name!r}: max_workers ({doc.get('max_workers')}) must be >= {min_sum}")


def structural(schema: Any) -> Any:
    """A CRD's OpenAPI v3 schema as the JSON Schema the API server enforces (see the module doc)."""
    if isinstance(schema, list):
        return [structural(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key.startswith("x-kubernetes-"):
            continue
        if key == "properties":
            out[key] = {name: structural(sub) for name, sub in value.items()}
        else:
            out[key] = structural(value) if key in _SUBSCHEMAS else value
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if schema.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def kuberay_schema_dir(root: Path) -> Path:
    """The vendored KubeRay CRDs of the project checkout at ``root``."""
    return root / KUBERAY_SCHEMAS


@lru_cache(maxsize=8)
def crd_schema(path: Path, version: str) -> dict[str, Any]:
    """The structural schema of ``version`` (``v1``) in the CRD file at ``path``."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # a safe loader, C-accelerated where built
    crd = yaml.load(path.read_text(encoding="utf-8"), Loader=loader)
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            result: dict[str, Any] = structural(entry["schema"]["openAPIV3Schema"])
            return result
    raise ConfigError(f"{path} has no version {version!r}")


def _validator(schema: Mapping[str, Any]) -> Any:
    import jsonschema

    return jsonschema.Draft4Validator(schema)  # OpenAPI v3.0 schemas are draft-4 shaped


def validate_kuberay(doc: Mapping[str, Any], schema_dir: Path | None = None) -> None:
    """A KubeRay manifest against its CRD (from ``schema_dir``; default: the vendored CRDs of the
    project holding the working directory); a ``List`` item by item. A Deployment's pod template
    is checked against the pod template schema the RayCluster CRD embeds (Kubernetes' own);
    other core objects (Service, PVC, NetworkPolicy, Namespace) for apiVersion, kind and name only."""
    schema_dir = schema_dir or kuberay_schema_dir(project_root(Path.cwd()))
    kind = doc.get("kind")
    if kind == "List":
        for i, item in enumerate(doc.get("items") or []):
            try:
                validate_kuberay(item, schema_dir)
            except ConfigError as exc:
                raise ConfigError(f"items[{i}]: {exc}") from None
        return
    name = (doc.get("metadata") or {}).get("name")
    if not (doc.get("apiVersion") and kind and name):
        raise ConfigError(f"a manifest needs apiVersion, kind and metadata.name; got kind {kind!r}, name {name!r}")
    if kind not in KUBERAY_CRDS and kind != "Deployment":
        return
    path = schema_dir / KUBERAY_CRDS.get(str(kind), KUBERAY_CRDS["RayCluster"])
    if not path.is_file():
        raise ConfigError(f"no KubeRay CRD at {path}: the project keeps them in {KUBERAY_SCHEMAS}/")
    if kind == "Deployment":
        spec = crd_schema(path, "v1")["properties"]["spec"]["properties"]
        template = (doc.get("spec") or {}).get("template")
        what = f"Deployment {name!r}: spec.template breaks Kubernetes' pod template schema"
        _check(_validator(spec["headGroupSpec"]["properties"]["template"]), template, what)
        return
    schema = crd_schema(path, str(doc["apiVersion"]).rsplit("/", 1)[-1])
    _check(_validator(schema), doc, f"{kind} {name!r} breaks KubeRay v1.7.0's CRD schema")
