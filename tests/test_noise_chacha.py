"""ChaCha20 keystream: RFC 8439 vectors, OpenSSL ≡ tensor backend, counter limits."""
from __future__ import annotations

import os

import pytest
import torch

from lightning_dp.noise import chacha20_keystream
from lightning_dp.noise.chacha import MAX_BLOCKS

BACKENDS = ("openssl", "torch")


def _hex(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


# RFC 8439 §2.3.2: test vector for the ChaCha20 block function (serialised block).
RFC_2_3_2_KEY = _hex(
    "00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f 10 11 12 13 14 15 16 17 18 19 1a 1b 1c 1d 1e 1f"
)
RFC_2_3_2_NONCE = _hex("00 00 00 09 00 00 00 4a 00 00 00 00")
RFC_2_3_2_BLOCK = _hex(
    """
    10 f1 e7 e4 d1 3b 59 15 50 0f dd 1f a3 20 71 c4
    c7 d1 f4 c7 33 c0 68 03 04 22 aa 9a c3 d4 6c 4e
    d2 82 64 46 07 9f aa 09 14 c2 d7 05 d9 8b 02 a2
    b5 12 9c d1 de 16 4e b9 cb d0 83 e8 a2 50 3c 4e
    """
)

# RFC 8439 §2.4.2: example and test vector for the ChaCha20 cipher (counter 1).
RFC_2_4_2_NONCE = _hex("00 00 00 00 00 00 00 4a 00 00 00 00")
RFC_2_4_2_PLAINTEXT = (
    b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, "
    b"sunscreen would be it."
)
RFC_2_4_2_CIPHERTEXT = _hex(
    """
    6e 2e 35 9a 25 68 f9 80 41 ba 07 28 dd 0d 69 81
    e9 7e 7a ec 1d 43 60 c2 0a 27 af cc fd 9f ae 0b
    f9 1b 65 c5 52 47 33 ab 8f 59 3d ab cd 62 b3 57
    16 39 d6 24 e6 51 52 ab 8f 53 0c 35 9f 08 61 d8
    07 ca 0d bf 50 0d 6a 61 56 a3 8e 08 8a 22 b6 5e
    52 bc 51 4d 16 cc f8 06 81 8c e9 1a b7 79 37 36
    5a f9 0b bf 74 a3 5b e6 b4 0b 8e ed f2 78 5e 42
    87 4d
    """
)

# RFC 8439 Appendix A.1: test vectors for the ChaCha20 block function, #1-#5 (key, nonce, counter, block).
RFC_A_1 = [
    (
        bytes(32),
        bytes(12),
        0,
        """
        76 b8 e0 ad a0 f1 3d 90 40 5d 6a e5 53 86 bd 28
        bd d2 19 b8 a0 8d ed 1a a8 36 ef cc 8b 77 0d c7
        da 41 59 7c 51 57 48 8d 77 24 e0 3f b8 d8 4a 37
        6a 43 b8 f4 15 18 a1 1c c3 87 b6 69 b2 ee 65 86
        """,
    ),
    (
        bytes(32),
        bytes(12),
        1,
        """
        9f 07 e7 be 55 51 38 7a 98 ba 97 7c 73 2d 08 0d
        cb 0f 29 a0 48 e3 65 69 12 c6 53 3e 32 ee 7a ed
        29 b7 21 76 9c e6 4e 43 d5 71 33 b0 74 d8 39 d5
        31 ed 1f 28 51 0a fb 45 ac e1 0a 1f 4b 79 4d 6f
        """,
    ),
    (
        bytes(31) + b"\x01",
        bytes(12),
        1,
        """
        3a eb 52 24 ec f8 49 92 9b 9d 82 8d b1 ce d4 dd
        83 20 25 e8 01 8b 81 60 b8 22 84 f3 c9 49 aa 5a
        8e ca 00 bb b4 a7 3b da d1 92 b5 c4 2f 73 f2 fd
        4e 27 36 44 c8 b3 61 25 a6 4a dd eb 00 6c 13 a0
        """,
    ),
    (
        b"\x00\xff" + bytes(30),
        bytes(12),
        2,
        """
        72 d5 4d fb f1 2e c4 4b 36 26 92 df 94 13 7f 32
        8f ea 8d a7 39 90 26 5e c1 bb be a1 ae 9a f0 ca
        13 b2 5a a2 6c b4 a6 48 cb 9b 9d 1b e6 5b 2c 09
        24 a6 6c 54 d5 45 ec 1b 73 74 f4 87 2e 99 f0 96
        """,
    ),
    (
        bytes(32),
        bytes(11) + b"\x02",
        0,
        """
        c2 c6 4d 37 8c d5 36 37 4a e2 04 b9 ef 93 3f cd
        1a 8b 22 88 b3 df a4 96 72 ab 76 5b 54 ee 27 c7
        8a 97 0e 0e 95 5c 14 f3 a8 8e 74 1b 97 c2 86 f7
        5f 8f c2 99 e8 14 83 62 fa 19 8a 39 53 1b ed 6d
        """,
    ),
]


def _bytes(t: torch.Tensor) -> bytes:
    return bytes(t.cpu().tolist())


@pytest.mark.smoke
@pytest.mark.parametrize("backend", BACKENDS)
def test_rfc_2_3_2_block_function(backend):
    block = chacha20_keystream(RFC_2_3_2_KEY, RFC_2_3_2_NONCE, 1, 64, backend=backend)
    assert block.dtype == torch.uint8 and block.shape == (64,)
    assert _bytes(block) == RFC_2_3_2_BLOCK


@pytest.mark.smoke
@pytest.mark.parametrize("backend", BACKENDS)
def test_rfc_2_4_2_encryption(backend):
    stream = chacha20_keystream(RFC_2_3_2_KEY, RFC_2_4_2_NONCE, 1, len(RFC_2_4_2_PLAINTEXT), backend=backend)
    plaintext = torch.tensor(list(RFC_2_4_2_PLAINTEXT), dtype=torch.uint8)
    assert _bytes(stream ^ plaintext) == RFC_2_4_2_CIPHERTEXT


@pytest.mark.smoke
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("index", range(len(RFC_A_1)))
def test_rfc_appendix_a_1(backend, index):
    key, nonce, counter, block = RFC_A_1[index]
    assert _bytes(chacha20_keystream(key, nonce, counter, 64, backend=backend)) == _hex(block)


@pytest.mark.parametrize(
    "counter, num_bytes",
    [(0, 1), (0, 63), (0, 64), (0, 65), (7, 1000), (12345, 64 * 300 + 17), (MAX_BLOCKS - 3, 150), (MAX_BLOCKS - 1, 64)],
)
def test_backends_agree(counter, num_bytes):
    key, nonce = os.urandom(32), os.urandom(12)
    ours = chacha20_keystream(key, nonce, counter, num_bytes, backend="torch")
    openssl = chacha20_keystream(key, nonce, counter, num_bytes, backend="openssl")
    assert ours.shape == (num_bytes,) and torch.equal(ours, openssl)


def test_backends_agree_across_torch_batches(monkeypatch):
    from lightning_dp.noise import chacha

    monkeypatch.setattr(chacha, "_TORCH_BATCH_BLOCKS", 3)  # force several tensor passes
    key, nonce = os.urandom(32), os.urandom(12)
    ours = chacha20_keystream(key, nonce, 5, 64 * 10 + 9, backend="torch")
    assert torch.equal(ours, chacha20_keystream(key, nonce, 5, 64 * 10 + 9, backend="openssl"))


def test_keystream_is_consistent_across_offsets():
    key, nonce = os.urandom(32), os.urandom(12)
    whole = chacha20_keystream(key, nonce, 0, 64 * 4)
    assert torch.equal(whole[128:], chacha20_keystream(key, nonce, 2, 128))


def test_auto_is_openssl_on_cpu_and_device_is_respected():
    stream = chacha20_keystream(bytes(32), bytes(12), 0, 4, device="cpu")
    assert stream.device.type == "cpu" and stream.tolist() == [0x76, 0xB8, 0xE0, 0xAD]
    assert chacha20_keystream(bytes(32), bytes(12), 0, 0).shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_counter_overflow_is_refused(backend):
    with pytest.raises(ValueError, match="32 bits"):
        chacha20_keystream(bytes(32), bytes(12), MAX_BLOCKS - 1, 65, backend=backend)
    with pytest.raises(ValueError, match="32 bits"):
        chacha20_keystream(bytes(32), bytes(12), MAX_BLOCKS, 0, backend=backend)
    assert chacha20_keystream(bytes(32), bytes(12), MAX_BLOCKS - 1, 64, backend=backend).shape == (64,)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(key=bytes(31)), "`key` must be 32 bytes"),
        (dict(key="0" * 32), "`key` must be 32 bytes"),
        (dict(nonce=bytes(16)), "`nonce` must be 12 bytes"),
        (dict(counter=-1), "`counter` must be an integer >= 0"),
        (dict(num_bytes=-5), "`num_bytes` must be an integer >= 0"),
        (dict(backend="aes"), "`backend` must be one of"),
    ],
)
def test_argument_errors(kwargs, match):
    args = dict(key=bytes(32), nonce=bytes(12), counter=0, num_bytes=8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        chacha20_keystream(**args)


def test_noise_package_does_not_import_lightning():
    import ast
    import pathlib

    import lightning_dp.noise as noise

    for path in pathlib.Path(noise.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            for name in names:
                assert "lightning" not in name.split(".")[0], (path.name, name)
                assert not name.startswith("..") or name == ".._checks", (path.name, name)
