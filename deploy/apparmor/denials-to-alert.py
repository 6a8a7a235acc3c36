#!/usr/bin/env python3
"""Forwards AppArmor denials of the kms-server profile to Keyhold's alert destinations.

The kernel reports a denied action as an audit record (`apparmor="DENIED" ...
profile="kms-server" operation="open" name="/home/x" ...`), not to the confined process.
Where that record lands depends on whether auditd runs:

- without auditd, in the kernel log (`journalctl -k`, dmesg):
    audit: type=1400 audit(1700000000.123:45): apparmor="DENIED" operation="open" ...
- with auditd, in /var/log/audit/audit.log (and no longer in the kernel log):
    type=AVC msg=audit(1700000000.123:45): apparmor="DENIED" operation="open" ...

This watcher reads both (`--journal` and `--audit-log PATH`, at the same time; each denial
is sent once, by its audit id `audit(time:serial)`, if it shows up in both), or lines on
standard input. It turns each denial of the profile (or of its child profiles,
`kms-server//...`) into the same event JSON the server sends (`{"kind","time","identity",
"detail"}`, kind `apparmor_denied`) and POSTs it to the `[alerts] webhook` and/or pipes it
to the `[alerts] command`. auditd's hex encoding of names with spaces or odd bytes is
decoded, and its "enriched" log format is understood.

Usage:
  denials-to-alert.py --journal --audit-log /var/log/audit/audit.log \\
      --webhook http://127.0.0.1:9100/keyhold-alerts
  journalctl -k -f -o cat | denials-to-alert.py --webhook ...     (kernel log only)
  denials-to-alert.py --command /usr/local/bin/keyhold-alert < audit.log
The followed audit log is read from its end (no alerts for old denials on a restart) and
followed across rotations; the journal is read from now on, and from its last entry if
journalctl has to be restarted. Run it as a service beside keyhold with read access to
the journal (group systemd-journal) and the audit log (root, or auditd's log_group).
"""

import argparse
import collections
import datetime
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

FIELD = re.compile(r'(\w+)=("([^"]*)"|\S+)')
AUDIT_ID = re.compile(r"audit\((\d+)\.(\d+):(\d+)\)")
HEX = re.compile(r"^(?:[0-9A-F]{2})+$")
# Fields the kernel logs with audit_log_untrustedstring: quoted, or hex when they hold a
# space, a quote, a control character or a non-ASCII byte.
UNTRUSTED = {"name", "comm", "profile", "peer", "target", "exe", "peer_addr", "addr", "path"}
DETAIL = ("operation", "name", "capname", "peer", "target", "requested_mask", "denied_mask", "comm", "pid")


def log(msg):
    print(f"denials-to-alert: {msg}", file=sys.stderr, flush=True)


def parse(line, profile):
    """The denial's fields, or None if the line is not a denial of `profile`."""
    line = line.split("\x1d", 1)[0]  # auditd's enriched format: translations after GS
    if 'apparmor="DENIED"' not in line:
        return None
    fields = {}
    for m in FIELD.finditer(line):
        key, quoted = m.group(1), m.group(3)
        if quoted is not None:
            value = quoted
        else:
            value = m.group(2)
            if key in UNTRUSTED and HEX.match(value):
                value = bytes.fromhex(value).decode("utf-8", "replace")
        fields.setdefault(key, value)
    p = fields.get("profile", "")
    if p != profile and not p.startswith(profile + "//"):
        return None
    m = AUDIT_ID.search(line)
    if m:
        fields["audit_id"] = f"{m.group(1)}.{m.group(2)}:{m.group(3)}"
    return fields


def event(fields):
    detail = " ".join(f"{k}={fields[k]}" for k in DETAIL if k in fields)
    if "audit_id" in fields:
        detail += f" audit={fields['audit_id']}"
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return {"kind": "apparmor_denied", "time": now, "identity": None, "detail": detail}


# ---- sources: each puts lines on one queue; None marks the end of a finite source ---------

def read_stdin(q):
    for line in sys.stdin:
        q.put(line)
    q.put(None)


def follow_file(q, path, poll=0.5):
    """Follow `path` like `tail -F`: from its end if it exists now, from the start of every
    file that appears later at that path (auditd's rotation renames the old one), reading
    the renamed file to its end first; a truncated file is read again from its start."""
    f, ident, partial, first = None, None, b"", True
    while True:
        if f is None:
            try:
                f = open(path, "rb")
            except FileNotFoundError:
                if first:
                    log(f"waiting for {path}")
                    first = False
                time.sleep(poll)
                continue
            st = os.fstat(f.fileno())
            ident = (st.st_dev, st.st_ino)
            if first:
                f.seek(0, os.SEEK_END)
                first = False
            log(f"following {path}")
        chunk = f.readline()
        if chunk:
            partial += chunk
            if partial.endswith(b"\n"):
                q.put(partial.decode("utf-8", "replace"))
                partial = b""
            continue
        try:
            st = os.stat(path)
            now = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            st, now = None, None
        if now != ident:
            if now is None:  # renamed, the new one not there yet: finish it when it is
                time.sleep(poll)
                if not os.path.exists(path):
                    continue
            for chunk in f.read().splitlines(keepends=True):
                partial += chunk
                if partial.endswith(b"\n"):
                    q.put(partial.decode("utf-8", "replace"))
                    partial = b""
            f.close()
            f, partial = None, b""
        elif st.st_size < f.tell():
            f.seek(0)
        else:
            time.sleep(poll)


class Journal:
    """`journalctl -f` over the kernel's transport, restarted after its last entry."""

    def __init__(self, q):
        self.q, self.proc, self.cursor, self.stopping = q, None, None, False
        self.lock = threading.Lock()  # no journalctl is started once stop() has run

    def run(self):
        while not self.stopping:
            cmd = ["journalctl", "--follow", "--output=json", "_TRANSPORT=kernel"]
            cmd += [f"--after-cursor={self.cursor}"] if self.cursor else ["--lines=0"]
            try:
                with self.lock:
                    if self.stopping:
                        break
                    self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
            except OSError as e:
                log(f"cannot run journalctl: {e}")
                time.sleep(5)
                continue
            log("following the kernel log (journalctl)")
            for raw in self.proc.stdout:
                try:
                    entry = json.loads(raw)
                except ValueError:
                    continue
                self.cursor = entry.get("__CURSOR", self.cursor)
                msg = entry.get("MESSAGE")
                if isinstance(msg, list):  # journald's form for a message that is not UTF-8
                    msg = bytes(msg).decode("utf-8", "replace")
                if isinstance(msg, str):
                    self.q.put(msg)
            code = self.proc.wait()
            if self.stopping:
                break
            log(f"journalctl exited ({code}); restarting after its last entry")
            time.sleep(1)

    def stop(self):
        with self.lock:
            self.stopping = True
            if self.proc and self.proc.poll() is None:
                self.proc.terminate()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="kms-server")
    ap.add_argument("--webhook")
    ap.add_argument("--command", nargs="+")
    ap.add_argument("--journal", action="store_true", help="follow the kernel log (journalctl)")
    ap.add_argument("--audit-log", action="append", default=[], metavar="PATH",
                    help="follow auditd's log, e.g. /var/log/audit/audit.log (repeatable)")
    args = ap.parse_args()
    if not args.webhook and not args.command:
        ap.error("give --webhook and/or --command")

    q = queue.Queue()
    journal = Journal(q) if args.journal else None

    def stop(*_):
        if journal:
            journal.stop()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    finite = not args.journal and not args.audit_log
    if finite:
        threading.Thread(target=read_stdin, args=(q,), daemon=True).start()
    for path in args.audit_log:
        threading.Thread(target=follow_file, args=(q, path), daemon=True).start()
    if journal:
        threading.Thread(target=journal.run, daemon=True).start()

    seen = collections.OrderedDict()  # audit ids already sent (one event, two sources)
    while True:
        try:
            line = q.get(timeout=1)
        except queue.Empty:
            continue
        if line is None:
            break
        fields = parse(line, args.profile)
        if fields is None:
            continue
        key = fields.get("audit_id")
        if key:
            if key in seen:
                continue
            seen[key] = True
            if len(seen) > 4096:
                seen.popitem(last=False)
        body = json.dumps(event(fields)).encode()
        if args.webhook:
            req = urllib.request.Request(args.webhook, data=body, headers={"content-type": "application/json"})
            try:
                urllib.request.urlopen(req, timeout=5).read()
            except OSError as e:
                log(f"webhook failed: {e}")
        if args.command:
            subprocess.run(args.command, input=body, check=False)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
