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


def _coefficients(packed: bytes, width: int) -> list[int]:
    """Reference unpacking with Python integers: value ``i`` is bits ``i*width ..`` LSB first."""
    big, mask = int.from_bytes(packed, "little"), (1 << width) - 1
    return [(big >> (i * width)) & mask for i in range(len(packed) * 8 // width)]


def test_packed_ciphertext_is_its_coefficients_in_q0_bits(keys):
    # Prepare
    sk, pk, _ = keys
    seal = pk.seal
    ct = seal.encrypt([complex(i, 1) for i in range(seal.slots)], 2.0**17)

    # Execute
    data = seal.save(ct)

    # Assert: 2 parts x 4096 coefficients x 60 bits, exactly SEAL's coefficients in its order
    assert seal.q0.bit_length() == 60 and len(data) == seal.ct_bytes == 2 * 4096 * 60 // 8
    assert _coefficients(data, 60) == [ct.dyn_array().at(i) for i in range(2 * 4096)]
    assert sk.seal.load(data, 2.0**17).scale == 2.0**17


def test_packed_ciphertext_of_the_wrong_length_is_refused(keys):
    _, pk, _ = keys
    data = pk.seal.save(pk.seal.encrypt([0j] * pk.seal.slots, 2.0**17))
    for bad in (data + b"\0", data[:-1], b""):
        with pytest.raises(InvalidMessage) as e:
            pk.seal.load(bad, 2.0**17)
        assert e.value.reason == "corrupt" and "bytes" in e.value.detail


def test_coefficient_at_or_beyond_the_modulus_is_refused(keys):
    # Prepare: a real ciphertext with one coefficient replaced by q0 (then by 2^60 - 1)
    _, pk, _ = keys
    seal = pk.seal
    data = seal.save(seal.encrypt([0j] * seal.slots, 2.0**17))
    for value in (seal.q0, (1 << 60) - 1):
        big = int.from_bytes(data, "little")
        pos = 60 * 4097
        big = (big & ~(((1 << 60) - 1) << pos)) | (value << pos)

        # Execute / Assert
        with pytest.raises(InvalidMessage) as e:
            seal.load(big.to_bytes(len(data), "little"), 2.0**17)
        assert e.value.reason == "corrupt" and "modulus" in e.value.detail


def test_a_ciphertext_loads_only_at_the_scale_it_is_read_at(keys):
    # A packed ciphertext carries no scale: the reader's plan supplies it, so one made at another
    # scale decrypts to values off by the ratio (the global's exactness checks refuse those sums)
    sk, pk, _ = keys
    data = pk.seal.save(pk.seal.encrypt([4.0 + 0j] * pk.seal.slots, 2.0**17))
    out = sk.seal.decrypt(sk.seal.load(data, 2.0**18))
    assert max(abs(z - 2.0) for z in out) < 8 * NOISE_AT_UNIT_SCALE / 2.0**18


@pytest.mark.parametrize("degree, moduli", [(8192, (60, 40, 60)), (4096, (40, 49))])
def test_ring_without_one_60_bit_data_prime_is_refused(degree, moduli):
    secret, _ = generate_keys(degree, moduli)
    with pytest.raises(InvalidMessage) as e:
        HEContext.from_bytes(secret)
    assert e.value.reason == "bad_context" and "data primes" in e.value.detail
