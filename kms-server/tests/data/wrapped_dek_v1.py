"""Independent reference implementation of the wrapped-DEK format v1 (kms-server/src/crypto/format.md),
written from the spec with Python's `cryptography` package. It produced
wrapped_dek_v1.json, the golden vector that kms-server's unit tests open.

Run: python3 kms-server/tests/data/wrapped_dek_v1.py > kms-server/tests/data/wrapped_dek_v1.json
"""
import json
import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF


def canonical(ctx):
    out = struct.pack(">I", len(ctx))
    for k in sorted(ctx, key=lambda s: s.encode()):
        kb, vb = k.encode(), ctx[k].encode()
        out += struct.pack(">I", len(kb)) + kb + struct.pack(">I", len(vb)) + vb
    return out


kek = bytes(range(32))
key_id = bytes(range(0xA0, 0xB0))
version = 7
salt = bytes(range(0x40, 0x60))
dek = bytes(range(0x80, 0xA0))
ctx = {"tenant": "acme", "object": "invoices/42"}

header = b"KW" + bytes([1, 1]) + key_id + struct.pack(">I", version) + salt
k_wrap = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=b"keyhold/wrapped-dek/v1").derive(kek)
sealed = AESGCM(k_wrap).encrypt(bytes(12), dek, header + canonical(ctx))
print(json.dumps({
    "kek": kek.hex(), "key_id": key_id.hex(), "version": version, "dek": dek.hex(),
    "context": ctx, "wrapped": (header + sealed).hex(),
}, indent=2))
