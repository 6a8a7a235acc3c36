"""An independent reader of the envelope format v1, written from FORMAT.md alone (Python,
`cryptography`). It opens the golden files with the golden DEK (skipping the provider)
and checks every rule of the spec. Run: python3 envelope/tests/golden/reference_reader.py
"""
import hashlib
import hmac
import os
import struct
import sys

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

H = lambda b: hashlib.sha256(b).digest()


def canonical(ctx):
    out = struct.pack(">I", len(ctx))
    for k in sorted(ctx, key=lambda s: s.encode()):
        kb, vb = k.encode(), ctx[k].encode()
        out += struct.pack(">I", len(kb)) + kb + struct.pack(">I", len(vb)) + vb
    return out


def open_envelope(env, dek, ctx):
    assert env[:4] == b"KHEV" and env[4] == 1 and env[5] == 1
    s = struct.unpack(">I", env[6:10])[0]
    k = env[10]
    p = 11 + k
    name = env[11:p].decode()
    version, = struct.unpack(">I", env[p:p + 4]); p += 4
    w, = struct.unpack(">H", env[p:p + 2]); p += 2
    p += w
    digest, salt, commitment = env[p:p + 32], env[p + 32:p + 64], env[p + 64:p + 96]
    header, prefix = env[:p + 96], env[:p + 64]
    assert hmac.compare_digest(digest, H(canonical(ctx)))
    prk = hmac.new(salt, dek, hashlib.sha256).digest()  # HKDF-Extract
    h = H(prefix)
    expand = lambda info: HKDFExpand(hashes.SHA256(), 32, info + h).derive(prk)
    data_key = expand(b"keyhold-envelope/v1/data-key")
    assert hmac.compare_digest(commitment, expand(b"keyhold-envelope/v1/commitment"))
    aad, body, aead = H(header), env[p + 96:], AESGCM(data_key)
    n = max(1, -(-len(body) // (s + 16)))
    out = b""
    for i in range(n):
        seg = body[i * (s + 16):(i + 1) * (s + 16)]
        nonce = b"\0\0\0" + struct.pack(">Q", i) + bytes([1 if i == n - 1 else 0])
        out += aead.decrypt(nonce, seg, aad)
    return name, version, out


here = os.path.dirname(os.path.abspath(__file__))
ctx = {"tenant": "acme", "object": "golden"}
for name, length in [("v1-empty", 0), ("v1-small", 100), ("v1-3seg-plus-1", 193), ("v1-default-seg", 70000)]:
    env = open(os.path.join(here, name + ".bin"), "rb").read()
    key, version, pt = open_envelope(env, bytes([0x22] * 32), ctx)
    assert (key, version) == ("golden", 1), (key, version)
    assert pt == bytes((7 * i + 3) % 256 for i in range(length)), name
    print(f"{name}: ok ({length} bytes)")
sys.exit(0)
