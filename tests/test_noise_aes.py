"""AES-256-CTR keystream (SP 800-38A vectors, counter offsets) and SecureRNG's choice of cipher."""
from __future__ import annotations

import pytest
import torch

from lightning_dp.noise import SecureRNG, aes, secure
from lightning_dp.noise.aes import aes256_ctr_keystream, aes_encryptor

# NIST SP 800-38A, F.5.5 CTR-AES256.Encrypt: key, initial counter block, plaintext, ciphertext.
SP800_38A_KEY = bytes.fromhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
SP800_38A_COUNTER = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
SP800_38A_PLAINTEXT = bytes.fromhex(
    "6bc1bee22e409f96e93d7e117393172a" "ae2d8a571e03ac9c9eb76fac45af8e51"
    "30c81c46a35ce411e5fbc1191a0a52ef" "f69f2445df4f9b17ad2b417be66c3710"
)
SP800_38A_CIPHERTEXT = bytes.fromhex(
    "601ec313775789a5b7a7f504bbf3d228" "f443e3ca4d62b59aca84e990cacaf5c5"
    "2b0930daa23de94ce87017ba2d84988d" "dfc9c58db67aada613c2dd08457941a6"
)


@pytest.mark.smoke
def test_sp800_38a_ctr_aes256_vector():
    """The counter block is the 8-byte nonce then the 64-bit big-endian block counter."""
    nonce, counter = SP800_38A_COUNTER[:8], int.from_bytes(SP800_38A_COUNTER[8:], "big")
    keystream = bytes(aes256_ctr_keystream(SP800_38A_KEY, nonce, counter, 64).tolist())
    assert bytes(p ^ k for p, k in zip(SP800_38A_PLAINTEXT, keystream)) == SP800_38A_CIPHERTEXT
    assert aes_encryptor(SP800_38A_KEY, nonce, counter).update(SP800_38A_PLAINTEXT) == SP800_38A_CIPHERTEXT


def test_keystream_is_consistent_across_offsets():
    key, nonce = bytes(range(32)), b"\x00\x01\x02\x03\x04\x05\x06\x07"
    whole = aes256_ctr_keystream(key, nonce, 0, 16 * 50)
    for counter in (0, 1, 7, 49):
        assert torch.equal(aes256_ctr_keystream(key, nonce, counter, 16), whole[16 * counter : 16 * counter + 16])
    assert aes256_ctr_keystream(key, nonce, 3, 0).shape == (0,)


def test_argument_errors():
    with pytest.raises(ValueError, match="32-byte key and an 8-byte nonce"):
        aes_encryptor(bytes(16), bytes(8))
    with pytest.raises(ValueError, match="32-byte key and an 8-byte nonce"):
        aes_encryptor(bytes(32), bytes(12))
    with pytest.raises(ValueError, match="below 2\\*\\*64"):
        aes_encryptor(bytes(32), bytes(8), 1 << 64)


def test_cipher_choice(monkeypatch):
    """auto: AES-256-CTR for CPU draws on a CPU with AES instructions, ChaCha20 everywhere else."""
    for has_aes in (True, False):
        monkeypatch.setattr(secure, "cpu_has_aes", lambda: has_aes)
        rng = SecureRNG()
        assert rng.cipher_for("cpu") == ("aes256-ctr" if has_aes else "chacha20")
        assert rng.cipher_for(torch.device("cuda")) == "chacha20"
        assert SecureRNG(backend="torch").cipher_for("cpu") == "chacha20"  # the tensor keystream is ChaCha20's
        assert SecureRNG(cipher="chacha20").cipher_for("cpu") == "chacha20"
        assert SecureRNG(cipher="aes256-ctr").cipher_for(torch.device("cuda")) == "aes256-ctr"


def test_cpu_has_aes_reads_cpuinfo():
    import platform

    if platform.system() != "Linux":
        assert aes.cpu_has_aes() is False
        return
    with open("/proc/cpuinfo") as cpuinfo:
        flags = [line for line in cpuinfo if line.split(":")[0].strip().lower() in ("flags", "features")]
    assert aes.cpu_has_aes() == bool(flags and "aes" in flags[0].split(":", 1)[1].split())


def test_ciphers_give_independent_streams_and_seeded_ones_replay():
    """The two ciphers use different keys (also from one seed) and so give different draws; each seeded
    stream replays; a generator pickled before the choice existed keeps the v1 (ChaCha20) stream."""
    import pickle

    chacha = SecureRNG(b"seed", cipher="chacha20").normal((64,), 1.0)
    aes_draw = SecureRNG(b"seed", cipher="aes256-ctr").normal((64,), 1.0)
    assert not torch.equal(chacha, aes_draw)
    assert torch.equal(SecureRNG(b"seed", cipher="aes256-ctr").normal((64,), 1.0), aes_draw)
    old = SecureRNG(b"seed", cipher="chacha20")
    state = old.__getstate__()
    del state["cipher"]
    restored = SecureRNG.__new__(SecureRNG)
    restored.__setstate__(state)
    assert restored.cipher == "chacha20" and torch.equal(restored.normal((64,), 1.0), chacha)
    assert "cipher='aes256-ctr'" in repr(SecureRNG(cipher="aes256-ctr"))
    assert pickle.loads(pickle.dumps(SecureRNG(cipher="aes256-ctr"))).cipher == "aes256-ctr"
