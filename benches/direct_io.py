#!/usr/bin/env python3
"""One group commit of the audit chain, two ways, on this machine's disk: `pwrite` +
`fdatasync` (what `audit/file.rs` does) against an `O_DIRECT | O_DSYNC` write of the
4 KiB blocks the batch touches, into space zero-filled ahead (as the chain file is).
A batch is 30 records of ~400 bytes (c = 64). Prints CPU and wall time per batch, both
ways twice. Run from the repository (the files go in the current directory):

    python3 benches/direct_io.py [batches]
"""
import mmap
import os
import resource
import sys
import time

N = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
BATCH = 30 * 400
BLOCK = 4096


def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def zero_fill(fd, total):
    zeros = mmap.mmap(-1, 1 << 20)
    off = 0
    while off < total:
        os.pwritev(fd, [zeros], off)
        off += 1 << 20
    os.fsync(fd)


def buffered(path):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    zero_fill(fd, N * BATCH + 2 * BLOCK)
    data, off = b"x" * BATCH, 0
    c0, t0 = cpu(), time.time()
    for _ in range(N):
        os.pwrite(fd, data, off)
        os.fdatasync(fd)
        off += BATCH
    c1, t1 = cpu(), time.time()
    os.close(fd)
    return (c1 - c0) / N * 1e6, (t1 - t0) / N * 1e6


def direct(path):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT | os.O_DSYNC, 0o600)
    zero_fill(fd, N * BATCH + 2 * BLOCK)
    buf, off = mmap.mmap(-1, BATCH + 2 * BLOCK), 0  # page-aligned, as O_DIRECT needs
    c0, t0 = cpu(), time.time()
    for _ in range(N):
        start = off // BLOCK * BLOCK
        end = (off + BATCH + BLOCK - 1) // BLOCK * BLOCK
        os.pwritev(fd, [memoryview(buf)[: end - start]], start)
        off += BATCH
    c1, t1 = cpu(), time.time()
    os.close(fd)
    return (c1 - c0) / N * 1e6, (t1 - t0) / N * 1e6


for f in (buffered, direct, buffered, direct):
    name = f"direct-io-{f.__name__}.tmp"
    cpu_us, wall_us = f(name)
    os.unlink(name)
    print(f"{f.__name__:9s} CPU per batch {cpu_us:6.1f} µs   time per batch {wall_us:6.1f} µs")
