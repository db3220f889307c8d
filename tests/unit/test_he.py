"""HE contexts: key separation, fingerprints, garbage refusal, ciphertext round trip."""

import pytest

from schemas.errors import InvalidMessage
from schemas.he import HEContext, fingerprint, generate_keys
from schemas.plan import NOISE_AT_UNIT_SCALE


@pytest.fixture(scope="module")
def keys():
    secret, public = generate_keys()
    return HEContext.from_bytes(secret), HEContext.from_bytes(public), public


def test_public_context_has_no_secret_and_same_fingerprint(keys):
    # Prepare
    sk, pk, public = keys

    # Assert
    assert sk.is_private and not pk.is_private
    assert sk.fingerprint == pk.fingerprint == fingerprint(public) == fingerprint(pk.public_bytes())
    assert pk.seal.decryptor is None


def test_other_keypair_has_other_fingerprint(keys):
    # Prepare
    _, pk, _ = keys

    # Execute
    other = HEContext.from_bytes(generate_keys()[1])

    # Assert
    assert other.fingerprint != pk.fingerprint


@pytest.mark.parametrize("data", [b"", b"garbage", bytes(1000)])
def test_garbage_context_is_refused(data):
    with pytest.raises(InvalidMessage) as e:
        HEContext.from_bytes(data)
    assert e.value.reason == "bad_context"


def test_ciphertext_round_trip_uses_both_halves(keys):
    # Prepare
    sk, pk, _ = keys
    values = [complex(i, -2 * i) for i in range(pk.seal.slots)]

    # Execute
    data = pk.seal.save(pk.seal.encrypt(values, 2.0**17))
    out = sk.seal.decrypt(sk.seal.load(data, 2.0**17))

    # Assert: every real and imaginary part within 8 sigma of the noise the lane planner assumes
    # for one ciphertext at this scale (schemas/plan.py; the decoder's rounding margin is 0.5)
    bound = 8 * NOISE_AT_UNIT_SCALE / 2.0**17
    errors = [abs(d) for a, b in zip(out, values) for d in ((a - b).real, (a - b).imag)]
    assert max(errors) < bound, (max(errors), bound)


def test_truncated_ciphertext_is_refused(keys):
    # Prepare
    _, pk, _ = keys
    data = pk.seal.save(pk.seal.encrypt([1.0 + 0j] * pk.seal.slots, 2.0**17))

    # Execute / Assert
    with pytest.raises(InvalidMessage) as e:
        pk.seal.load(data[:-100], 2.0**17)
    assert e.value.reason == "corrupt"
