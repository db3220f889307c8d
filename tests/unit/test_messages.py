"""Wire contract: messages round-trip, old messages decode, envelopes verify, bad input is named."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf import descriptor_pb2

from schemas import fedstream_pb2 as pb
from schemas.errors import InvalidMessage
from schemas.signing import Identity, TrustStore, header, open_envelope, open_model_version, seal

ROOT = Path(__file__).resolve().parents[2]


def _protoc(proto: Path, out: Path, *extra: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{proto.parent}", *extra, str(proto)],
        check=True, cwd=out,
    )


def test_generated_code_is_not_stale(tmp_path):
    # Prepare: compile the .proto into a descriptor set
    _protoc(ROOT / "schemas/fedstream.proto", tmp_path, f"--descriptor_set_out={tmp_path/'d.pb'}")
    fresh = descriptor_pb2.FileDescriptorSet.FromString((tmp_path / "d.pb").read_bytes()).file[0]
    # Assert: the committed generated module carries the same descriptor
    committed = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    for msg in fresh.message_type:  # protoc fills json_name in descriptor sets only
        for field in msg.field:
            field.ClearField("json_name")
        for nested in msg.nested_type:
            for field in nested.field:
                field.ClearField("json_name")
    assert committed == fresh, "schemas/fedstream_pb2.py is stale: run `make proto`"


def _sample_messages():
    hdr = header("agent-001", 3, 7, "ab" * 32, chunk_index=1, chunk_count=4)
    codec = pb.CodecSpec(bits=8, clip_l2=1.0, clip_coord=0.05, max_summands=64, weight_cap=1024,
                         encrypted=True, chunk_bytes=1 << 20)
    task = pb.RoundTask(round=3, model_version=7, codec=codec, deadline_unix=1.5e9,
                        min_participants=2, he_fingerprint="ab" * 32, seed=42,
                        selected_agents=["agent-001"], model_name="cnn", task_name="digits",
                        train=pb.TrainSpec(optimizer="sgd", lr=0.1, epochs=2, batch_size=16))
    return [
        pb.UpdateChunk(header=hdr, agent_id="agent-001", region="region-0", payload=b"\x01" * 100,
                       eval=pb.EvalSums(loss_sum=1.5, accuracy_sum=9.0, count=10)),
        pb.PartialChunk(header=hdr, region="region-0", agents=["agent-001", "agent-002"],
                        payload=b"\x02" * 50),
        pb.Receipt(header=hdr, region="region-0", agents=["agent-001"]),
        pb.ModelVersion(header=hdr, model_name="cnn", num_params=2, params=b"\0" * 8,
                        next_task=task, provenance=pb.Provenance(
                            parent_version=6, round=2, strategy="fedavg",
                            participants=[pb.RegionParticipants(region="r", agents=["a"])])),
    ]


@pytest.mark.parametrize("msg", _sample_messages(), ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg):
    again = type(msg).FromString(msg.SerializeToString())
    assert again == msg


def test_message_written_by_v0_still_decodes(tmp_path):
    # Prepare: build the frozen v0 schema and write messages with it
    _protoc(ROOT / "schemas/compat/fedstream_v0.proto", tmp_path, f"--python_out={tmp_path}")
    spec = importlib.util.spec_from_file_location("fedstream_v0_pb2", tmp_path / "fedstream_v0_pb2.py")
    v0 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(v0)
    old = v0.UpdateChunk(header=v0.Header(schema_version=1, sender="agent-9", round=5,
                                          chunk_index=2, chunk_count=3),
                         agent_id="agent-9", region="region-1", payload=b"xyz")
    # Execute: decode with the current schema
    new = pb.UpdateChunk.FromString(old.SerializeToString())
    # Assert: every v0 field survives; the field added later reads as its default
    assert (new.agent_id, new.region, new.payload) == ("agent-9", "region-1", b"xyz")
    assert (new.header.round, new.header.chunk_index, new.header.chunk_count) == (5, 2, 3)
    assert not new.HasField("eval")
    # and the reverse: a v1 message decodes with v0 code (unknown field kept, ignored)
    back = v0.UpdateChunk.FromString(_sample_messages()[0].SerializeToString())
    assert back.agent_id == "agent-001"


@pytest.fixture
def keys():
    good = Ed25519PrivateKey.generate()
    other = Ed25519PrivateKey.generate()
    trust = TrustStore({"agent-001": Identity("agent-001", "agent", "region-0", good.public_key())})
    return good, other, trust


def test_sealed_envelope_verifies(keys):
    good, _, trust = keys
    msg = _sample_messages()[0]
    opened = open_envelope(seal(pb.UPDATE_CHUNK, msg, "agent-001", good, topic=TOPIC),
                           pb.UPDATE_CHUNK, trust, max_bytes=1 << 20, topic=TOPIC)
    assert opened.body == msg and opened.signer.name == "agent-001"


TOPIC = "fed-a/region-0/updates/agent-001"


def _reason(data, trust, kind=pb.UPDATE_CHUNK, max_bytes=1 << 20, topic=TOPIC):
    with pytest.raises(InvalidMessage) as exc:
        open_envelope(data, kind, trust, max_bytes=max_bytes, topic=topic)
    return exc.value.reason


def test_bad_envelopes_are_named(keys):
    good, other, trust = keys
    msg = _sample_messages()[0]
    data = seal(pb.UPDATE_CHUNK, msg, "agent-001", good, topic=TOPIC)
    env = pb.Envelope.FromString(data)

    tampered = bytearray(data)
    tampered[len(tampered) - 80] ^= 0x01  # inside the body
    unsigned = pb.Envelope(schema_version=1, kind=pb.UPDATE_CHUNK, signer="agent-001", body=env.body)
    v2 = pb.Envelope.FromString(data)
    v2.schema_version = 2

    assert _reason(data[: len(data) // 2], trust) == "malformed"
    assert _reason(bytes(tampered), trust) == "bad_signature"
    assert _reason(seal(pb.UPDATE_CHUNK, msg, "agent-001", other, topic=TOPIC), trust) == \
        "bad_signature"
    # bound to the topic, and so to the federation (namespace) and to the agent's own topic
    assert _reason(data, trust, topic="fed-b/region-0/updates/agent-001") == "bad_signature"
    assert _reason(data, trust, topic="fed-a/region-0/updates/agent-002") == "bad_signature"
    assert _reason(unsigned.SerializeToString(), trust) == "unsigned"
    assert _reason(v2.SerializeToString(), trust) == "wrong_version"
    assert _reason(data, trust, kind=pb.PARTIAL_CHUNK) == "wrong_kind"
    assert _reason(data, trust, max_bytes=100) == "oversized"
    assert _reason(seal(pb.UPDATE_CHUNK, msg, "agent-404", good, topic=TOPIC), trust) == "unknown_signer"
    assert _reason(b"\xff\xff\xff\xff", trust) == "malformed"
    # a body whose header names someone else than the signer
    trust2 = TrustStore({"agent-002": Identity("agent-002", "agent", "region-0", good.public_key())})
    assert _reason(seal(pb.UPDATE_CHUNK, msg, "agent-002", good, topic=TOPIC), trust2) == "sender_mismatch"


def test_only_the_global_aggregator_may_sign_a_model_version():
    glob, region = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    trust = TrustStore({"global": Identity("global", "global", "", glob.public_key()),
                        "region-0": Identity("region-0", "region", "region-0",
                                             region.public_key())})
    mv = pb.ModelVersion(header=header("global", 1, 1, "ab" * 32), model_name="m", num_params=0)
    assert open_model_version(seal(pb.MODEL_VERSION, mv, "global", glob, topic="f.models"),
                              trust, max_bytes=1 << 20, topic="f.models") == mv
    mv.header.sender = "region-0"
    with pytest.raises(InvalidMessage) as exc:
        open_model_version(seal(pb.MODEL_VERSION, mv, "region-0", region, topic="f.models"), trust,
                           max_bytes=1 << 20, topic="f.models")
    assert exc.value.reason == "unauthorized"
