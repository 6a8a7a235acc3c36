"""Makes the KMIP request bodies of benches/kmip.sh: as the admin, Create and Activate a
key (KMIP 1.2); then, as the app (which the script grants), one Encrypt of a 32-byte DEK,
whose answer makes the Decrypt request. Writes OUT/encrypt.ttlv and OUT/decrypt.ttlv (one
TTLV Request Message each, as the load generator sends them).

Usage: kmip_bodies.py HOST PORT PKI_DIR OUT STEP   (STEP: create | bodies)
The TTLV encoder is the profile runner's (tests/fixtures/kmip/profile_runner.py).
"""

import os
import socket
import ssl
import struct
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "kmip"))
from profile_runner import decode, encode, recv_exact, tag_of  # noqa: E402

HOST, PORT, PKI, OUT, STEP = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
KEY = "bench-kmip"
S, I, E, T, B = 1, 2, 5, 7, 8


def item(name, ty, value):
    return (tag_of(name), ty, value)


def request(op, payload):
    return item("RequestMessage", S, [
        item("RequestHeader", S, [
            item("ProtocolVersion", S, [item("ProtocolVersionMajor", I, 1),
                                        item("ProtocolVersionMinor", I, 2)]),
            item("BatchCount", I, 1)]),
        item("BatchItem", S, [item("Operation", E, op), item("RequestPayload", S, payload)])])


def call(who, op, payload):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(os.path.join(PKI, "ca.pem"))
    ctx.load_cert_chain(os.path.join(PKI, f"{who}.pem"), os.path.join(PKI, f"{who}-key.pem"))
    with ctx.wrap_socket(socket.create_connection((HOST, PORT))) as s:
        s.sendall(encode(request(op, payload)))
        head = recv_exact(s, 8)
        answer, _ = decode(head + recv_exact(s, struct.unpack(">I", head[4:])[0]))
    batch = [c for c in answer[2] if c[0] == tag_of("BatchItem")][0]
    fields = {c[0]: c for c in batch[2]}
    if fields[tag_of("ResultStatus")][2] != 0:
        sys.exit(f"KMIP operation 0x{op:02x} failed: {fields.get(tag_of('ResultMessage'))}")
    return {c[0]: c[2] for c in fields[tag_of("ResponsePayload")][2]}


uid = item("UniqueIdentifier", T, KEY)
if STEP == "create":
    attrs = [item("Attribute", S, [item("AttributeName", T, "Cryptographic Algorithm"),
                                   item("AttributeValue", E, 3)]),
             item("Attribute", S, [item("AttributeName", T, "Cryptographic Length"),
                                   item("AttributeValue", I, 256)]),
             item("Attribute", S, [item("AttributeName", T, "Name"),
                                   item("AttributeValue", S, [item("NameValue", T, KEY),
                                                              item("NameType", E, 1)])])]
    call("admin", 0x01, [item("ObjectType", E, 2), item("TemplateAttribute", S, attrs)])
    call("admin", 0x12, [uid])
else:
    dek = os.urandom(32)
    encrypt = [uid, item("Data", B, dek)]
    answer = call("app", 0x1F, encrypt)
    decrypt = [uid, item("Data", B, answer[tag_of("Data")]),
               item("IVCounterNonce", B, answer[tag_of("IVCounterNonce")])]
    assert call("app", 0x20, decrypt)[tag_of("Data")] == dek
    open(os.path.join(OUT, "encrypt.ttlv"), "wb").write(encode(request(0x1F, encrypt)))
    open(os.path.join(OUT, "decrypt.ttlv"), "wb").write(encode(request(0x20, decrypt)))
