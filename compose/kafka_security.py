"""Who may do what on a locked-down Kafka: a federation's ACLs as data, and how to apply them.

The broker (``LocalStack(secure=True)``, or any Kafka set up the same way) takes each client's
principal from its certificate's CN (``User:global``, ``User:region-0``, ...), denies whatever no
ACL allows and lets only ``User:kafka-broker`` and ``User:admin`` (super users) do anything. For a
namespace ``ns`` (topics ``ns.partials``, ``ns.models``, ``ns.history``, ``ns.control``,
``ns.fleet``),
:func:`federation_acls` allows exactly what the services do:

- a region ``r`` writes partials, in transactions under its own transactional id
  ``ns-regional-r`` (its replicas under ``ns-regional-r-<replica>``, a prefixed ACL ending in
  ``-``), reads the models and fleet topics, and reads partials back (replicas learn what the
  others committed; this shows a region the other regions' participant lists and encrypted sums,
  never a clear update), all by assignment: no consumer group;
- the global aggregator reads partials and control (by assignment, committing its position with
  each model version into the group ``ns-global``: group READ), writes and reads models and
  the model history (the same transaction), in transactions under ``ns-global``, and reads fleet;
- the operator writes control and fleet, reads fleet, models and history, and may create (and
  describe) the federation's five topics (``fedstream-fleet``/``ensure_topics``);
- a streaming consumer reads models and history, and may use consumer groups whose names start
  with ``ns-consumer``;
- a device gets nothing (and its certificate, from its region's CA, does not even pass the TLS
  handshake: Kafka trusts the Kafka CA only).

Nobody else gets anything: a region cannot write models or use another identity's transactional
id, a consumer cannot read partials. DESCRIBE is listed next to READ/WRITE although Kafka implies
it, so the table reads the same as the broker's ``describe``. Idempotent (non-transactional)
producers need nothing more: since Kafka 3.0 a WRITE on any topic lets a principal get a
producer id. Caveat of the consumers' prefixed ACL: ``ns-consumer`` also matches the groups of a
namespace ``ns-consumer<anything>``, so don't give two federations of one cluster namespaces where
one is such a prefix of the other; and all streaming consumers share that group prefix.

Applying them: confluent-kafka's ``AdminClient.create_acls`` (librdkafka; a public, maintained
API, PEM files as they are). One CreateAcls request carries every ACL: 40 ACLs take about 0.1 s
over mutual TLS, connection included. The alternatives measured: Kafka's own
``org.apache.kafka.tools.AclCommand`` from the jars the stack already has costs one JVM (about
2.2 s) per principal-set x resource-set x operation-set, i.e. 20-40 s for one federation;
aiokafka 0.14 has no ACL admin API, and sending its protocol's ``CreateAclsRequest`` through the
admin client's private ``_send_request`` is as fast but leans on internals that changed between
aiokafka releases. Creating an ACL that exists already is a no-op, so applying twice is safe.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from schemas.kafka import KafkaConn
from schemas.topics import Topics

log = logging.getLogger("fedstream.kafka_security")

RESOURCE_TYPES = ("topic", "group", "transactional_id", "cluster")
PATTERNS = ("literal", "prefixed")
OPERATIONS = ("all", "read", "write", "create", "delete", "alter", "describe", "cluster_action",
              "describe_configs", "alter_configs", "idempotent_write")
PERMISSIONS = ("allow", "deny")
CLUSTER = "kafka-cluster"  # the one name of the cluster resource


@dataclass(frozen=True, order=True)
class Acl:
    """One ACL binding: ``principal`` may (or may not) do ``operation`` on the resource(s)
    ``resource_type``/``resource_name`` (the name exactly, or every name it prefixes)."""

    principal: str  # "User:<certificate CN>"
    resource_type: str  # topic | group | transactional_id | cluster
    resource_name: str
    pattern: str  # literal | prefixed
    operation: str  # read | write | create | describe | ...
    permission: str = "allow"
    host: str = "*"

    def __post_init__(self) -> None:
        if not self.principal.startswith("User:") or len(self.principal) == len("User:"):
            raise ValueError(f"principal {self.principal!r}: expected 'User:<name>'")
        for value, allowed, what in ((self.resource_type, RESOURCE_TYPES, "resource type"),
                                     (self.pattern, PATTERNS, "pattern"),
                                     (self.operation, OPERATIONS, "operation"),
                                     (self.permission, PERMISSIONS, "permission")):
            if value not in allowed:
                raise ValueError(f"{what} {value!r}: expected one of {', '.join(allowed)}")
        if not self.resource_name:
            raise ValueError("empty resource name")
        if self.resource_type == "cluster" and self.resource_name != CLUSTER:
            raise ValueError(f"the cluster resource is named {CLUSTER!r}")

    def __str__(self) -> str:
        star = "*" if self.pattern == "prefixed" else ""
        return (f"{self.principal} {self.permission} {self.operation} "
                f"{self.resource_type}:{self.resource_name}{star}")


def regional_transactional_id(namespace: str, region: str) -> str:
    """The transactional id of ``region``'s aggregator (regional_aggregator/service.py)."""
    return f"{namespace}-regional-{region}"


def global_transactional_id(namespace: str) -> str:
    """The global aggregator's transactional id (GlobalSettings.transactional_id)."""
    return f"{namespace}-global"


def global_group_id(namespace: str) -> str:
    """The group the global aggregator commits its partials/control positions to
    (GlobalSettings.group_id)."""
    return f"{namespace}-global"


def consumer_group_prefix(namespace: str) -> str:
    """Streaming consumers may use any consumer group whose name starts with this."""
    return f"{namespace}-consumer"


def federation_acls(namespace: str, regions: Sequence[str], *, global_id: str = "global",
                    operator_id: str = "operator",
                    consumers: Iterable[str] = ("consumer",)) -> list[Acl]:
    """Every ACL that namespace ``namespace``'s federation needs, and nothing more (see the
    module docstring). ``regions``, ``global_id``, ``operator_id``, ``consumers``: the CNs of
    the Kafka client certificates of those identities."""
    t = Topics(namespace)
    acls: list[Acl] = []

    def allow(who: str, rtype: str, name: str, *ops: str, pattern: str = "literal") -> None:
        for op in ops:
            acls.append(Acl(f"User:{who}", rtype, name, pattern, op))

    for region in regions:
        # read: a region's replicas read back the batches committed before theirs
        allow(region, "topic", t.partials, "write", "describe", "read")
        allow(region, "transactional_id", regional_transactional_id(namespace, region),
              "write", "describe")
        allow(region, "transactional_id", regional_transactional_id(namespace, region) + "-",
              "write", "describe", pattern="prefixed")  # its replicas: <id>-<replica>
        allow(region, "topic", t.models, "read", "describe")
        allow(region, "topic", t.fleet, "read", "describe")

    allow(global_id, "topic", t.partials, "read", "describe")
    allow(global_id, "topic", t.control, "read", "describe")
    allow(global_id, "group", global_group_id(namespace), "read")
    allow(global_id, "topic", t.models, "write", "describe", "read")
    allow(global_id, "topic", t.history, "write", "describe", "read")
    allow(global_id, "transactional_id", global_transactional_id(namespace), "write", "describe")
    allow(global_id, "topic", t.fleet, "read", "describe")

    allow(operator_id, "topic", t.control, "write", "describe")
    allow(operator_id, "topic", t.fleet, "write", "describe", "read")
    allow(operator_id, "topic", t.models, "read", "describe")
    allow(operator_id, "topic", t.history, "read", "describe")
    for topic in (t.partials, t.models, t.history, t.control, t.fleet):  # literal: no other ns'
        allow(operator_id, "topic", topic, "create", "describe")

    for consumer in consumers:
        allow(consumer, "topic", t.models, "read", "describe")
        allow(consumer, "topic", t.history, "read", "describe")
        allow(consumer, "group", consumer_group_prefix(namespace), "read", pattern="prefixed")

    return list(dict.fromkeys(acls))  # one of each, in order


# ----------------------------------------------------------------------------------------------
# the broker side (confluent-kafka's admin client)


def _admin(conn: KafkaConn, timeout: float) -> Any:
    from confluent_kafka.admin import AdminClient

    cfg: dict[str, Any] = {"bootstrap.servers": conn.bootstrap, "socket.timeout.ms":
                           int(timeout * 1000), "logger": log}
    if conn.tls is not None:
        cfg.update({"security.protocol": "SSL", "ssl.ca.location": str(conn.tls.ca),
                    "ssl.certificate.location": str(conn.tls.cert),
                    "ssl.key.location": str(conn.tls.key)})
    return AdminClient(cfg)


def _binding(acl: Acl) -> Any:
    from confluent_kafka.admin import (
        AclBinding,
        AclOperation,
        AclPermissionType,
        ResourcePatternType,
        ResourceType,
    )

    rtype = ResourceType.BROKER if acl.resource_type == "cluster" else \
        ResourceType[acl.resource_type.upper()]
    return AclBinding(rtype, acl.resource_name, ResourcePatternType[acl.pattern.upper()],
                      acl.principal, acl.host, AclOperation[acl.operation.upper()],
                      AclPermissionType[acl.permission.upper()])


def _acl(binding: Any) -> Acl:
    rtype = binding.restype.name.lower()
    return Acl(binding.principal, "cluster" if rtype == "broker" else rtype, binding.name,
               binding.resource_pattern_type.name.lower(), binding.operation.name.lower(),
               binding.permission_type.name.lower(), binding.host)


def apply_acls(conn: KafkaConn, acls: Iterable[Acl], *, timeout: float = 30.0) -> None:
    """Create ``acls`` on the broker (one request), as ``conn``'s identity, which must be allowed
    to (a super user, or ALTER on the cluster). Raises :class:`KafkaAclError` naming every ACL
    the broker refused."""
    acls = list(dict.fromkeys(acls))
    if not acls:
        return
    admin = _admin(conn, timeout)
    futures = admin.create_acls([_binding(a) for a in acls], request_timeout=timeout)
    failed: list[str] = []
    for binding, future in futures.items():
        try:
            future.result(timeout=timeout + 5)
        except Exception as exc:  # KafkaException, or a timeout of the whole request
            failed.append(f"{_acl(binding)}: {exc}")
    if failed:
        raise KafkaAclError(f"{len(failed)} of {len(acls)} ACLs refused:\n" + "\n".join(failed))
    log.info("applied %d Kafka ACLs", len(acls))


def describe_acls(conn: KafkaConn, *, principal: str | None = None,
                  timeout: float = 30.0) -> list[Acl]:
    """The ACLs on the broker (all of them, or ``principal``'s), sorted."""
    from confluent_kafka.admin import (
        AclBindingFilter,
        AclOperation,
        AclPermissionType,
        ResourcePatternType,
        ResourceType,
    )

    admin = _admin(conn, timeout)
    # None matches any name / principal / host (librdkafka's filter; the stubs say str)
    anything: Any = None
    who: Any = principal
    flt = AclBindingFilter(ResourceType.ANY, anything, ResourcePatternType.ANY, who, anything,
                           AclOperation.ANY, AclPermissionType.ANY)
    bindings = admin.describe_acls(flt, request_timeout=timeout).result(timeout=timeout + 5)
    return sorted(_acl(b) for b in bindings)


class KafkaAclError(RuntimeError):
    """The broker refused some of the ACLs (the message lists them with the broker's reason)."""
