"""What a real API server gives pods and kmock does not: TLS, ServiceAccount tokens, RBAC.

`ClusterAuth(km, workdir)` makes a self-signed certificate for 127.0.0.1 (openssl), serves
the emulator over HTTPS on its own loopback port (`KMock.serve_https`) and checks every
request on that port as an API server would:

- authentication: the bearer token must be one this object issued (`token_for`, which the
  kubelet mounts into a pod with the CA and the namespace, as the ServiceAccount admission
  and kubelet do), else 401;
- authorization (RBAC): the namespace's RoleBindings naming that ServiceAccount, and the
  rules of the Roles they bind (apiGroups, resources incl. subresources such as
  `pods/log`, verbs, resourceNames), else 403 with the API server's own message.
  ClusterRoles are not emulated (the chart binds a namespaced Role only).

Every decision is recorded (`denied`, `allowed`), so a test can show that the controller's
requests passed the chart's Role, and name the one that did not.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kmock

from tests.kmock_server import KMock

ROLES = kmock.resource("rbac.authorization.k8s.io/v1/roles")
BINDINGS = kmock.resource("rbac.authorization.k8s.io/v1/rolebindings")
HOST = "127.0.0.1"


def request_verb(request: Any) -> str:
    """The RBAC verb of an API request (as the API server's request-info resolver)."""
    method = request.method.value
    if method == "GET":
        if request.params.get("watch") in ("true", "1"):
            return "watch"
        return "get" if request.name else "list"
    return {
        "POST": "create",
        "PUT": "update",
        "PATCH": "patch",
        "DELETE": "delete" if request.name else "deletecollection",
    }.get(method, method.lower())


def rule_allows(rule: dict[str, Any], group: str, resource: str, verb: str, name: str) -> bool:
    def has(key: str, value: str) -> bool:
        values = rule.get(key) or []
        return "*" in values or value in values

    names = rule.get("resourceNames") or []
    return (
        has("apiGroups", group)
        and has("resources", resource)
        and has("verbs", verb)
        and (not names or name in names)
    )


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """(certificate, key) for 127.0.0.1, the certificate being its own CA (the pods' ca.crt)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("the pods tests need openssl (apt-get install openssl)")
    cert, key = directory / "apiserver.crt", directory / "apiserver.key"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=kmock-apiserver", "-addext", f"subjectAltName=IP:{HOST}",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@dataclass
class ClusterAuth:
    km: KMock
    workdir: Path
    tokens: dict[str, tuple[str, str]] = field(default_factory=dict)  # token -> (ns, sa)
    allowed: list[str] = field(default_factory=list)  # "<sa> <verb> <group>/<resource>"
    denied: list[str] = field(default_factory=list)  # the API server's 401/403 messages

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ca_cert, key = self_signed_certificate(self.workdir)
        self.port = self.km.serve_https(str(self.ca_cert), str(key), self.authorize)

    def token_for(self, namespace: str, service_account: str) -> str:
        """A bearer token of the ServiceAccount (one per account, as a projected token)."""
        for token, who in self.tokens.items():
            if who == (namespace, service_account):
                return token
        token = secrets.token_urlsafe(24)
        self.tokens[token] = (namespace, service_account)
        return token

    # runs in the emulator's loop: reads its objects directly

    def _objects(self, resource: Any, namespace: str) -> list[dict[str, Any]]:
        return [
            obj.raw
            for (res, ns, _), obj in self.km.emu.objects.items()
            if res == resource and ns == namespace and not obj.deleted
        ]

    def _rules(self, namespace: str, service_account: str) -> list[dict[str, Any]]:
        roles = {r["metadata"]["name"]: r for r in self._objects(ROLES, namespace)}
        rules: list[dict[str, Any]] = []
        for binding in self._objects(BINDINGS, namespace):
            ref = binding.get("roleRef") or {}
            subjects = binding.get("subjects") or []
            if ref.get("kind") != "Role" or not any(
                s.get("kind") == "ServiceAccount"
                and s.get("name") == service_account
                and (s.get("namespace") or namespace) == namespace
                for s in subjects
            ):
                continue
            rules += (roles.get(ref.get("name")) or {}).get("rules") or []
        return rules

    def authorize(self, request: Any) -> None:
        header = request.headers.get("Authorization") or request.headers.get("authorization")
        scheme, _, token = (header or "").strip().partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        if token not in self.tokens:
            self.denied.append(f"401 Unauthorized: {request.method.value} {request.url.path}")
            raise kmock.KubernetesError(401, "Unauthorized", "Unauthorized")
        sa_namespace, sa = self.tokens[token]
        user = f"system:serviceaccount:{sa_namespace}:{sa}"
        if request.resource is None:  # discovery (/api, /apis, /version): any account
            return
        group = request.resource.group or ""
        plural = request.resource.plural or ""
        resource = f"{plural}/{request.subresource}" if request.subresource else plural
        verb = request_verb(request)
        namespace = request.namespace or ""
        name = request.name or ""
        if namespace == sa_namespace and any(
            rule_allows(rule, group, resource, verb, name) for rule in self._rules(namespace, sa)
        ):
            self.allowed.append(f"{sa} {verb} {group}/{resource}")
            return
        what = f"{plural}.{group}" if group else plural
        subject = f'{what} "{name}"' if name else what
        scope = f' in the namespace "{namespace}"' if namespace else " at the cluster scope"
        message = (
            f'{subject} is forbidden: User "{user}" cannot {verb} resource "{resource}" '
            f'in API group "{group}"{scope}'
        )
        self.denied.append(message)
        raise kmock.KubernetesError(403, "Forbidden", message)
