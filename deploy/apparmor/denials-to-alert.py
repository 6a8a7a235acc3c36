#!/usr/bin/env python3
"""Forwards AppArmor denials of the kms-server profile to Keyhold's alert destinations.

The kernel reports a denied action as an audit line (`apparmor="DENIED" ...
profile="kms-server" operation="open" name="/home/x" ...`) in the kernel log / journal,
not to the confined process. This watcher turns each one into the same event JSON the
server sends (`{"kind","time","identity","detail"}`, kind `apparmor_denied`) and POSTs it
to the `[alerts] webhook` and/or pipes it to the `[alerts] command`.

Usage:
  journalctl -k -f -o cat | denials-to-alert.py --webhook http://127.0.0.1:9100/keyhold-alerts
  denials-to-alert.py --command /usr/local/bin/keyhold-alert < kern.log
Run it as a systemd service beside keyhold (it needs read access to the kernel log).
"""

import argparse
import datetime
import json
import re
import subprocess
import sys
import urllib.request

FIELD = re.compile(r'(\w+)=("([^"]*)"|\S+)')


def parse(line, profile):
    """The denial's fields, or None if the line is not a denial of `profile`."""
    if 'apparmor="DENIED"' not in line:
        return None
    fields = {m.group(1): (m.group(3) if m.group(3) is not None else m.group(2))
              for m in FIELD.finditer(line)}
    if fields.get("profile") != profile:
        return None
    return fields


def event(fields):
    detail = " ".join(f"{k}={fields[k]}" for k in ("operation", "name", "requested_mask", "denied_mask", "comm", "pid")
                      if k in fields)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return {"kind": "apparmor_denied", "time": now, "identity": None, "detail": detail}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="kms-server")
    ap.add_argument("--webhook")
    ap.add_argument("--command", nargs="+")
    args = ap.parse_args()
    if not args.webhook and not args.command:
        ap.error("give --webhook and/or --command")
    for line in sys.stdin:
        fields = parse(line, args.profile)
        if fields is None:
            continue
        body = json.dumps(event(fields)).encode()
        if args.webhook:
            req = urllib.request.Request(args.webhook, data=body, headers={"content-type": "application/json"})
            try:
                urllib.request.urlopen(req, timeout=5).read()
            except OSError as e:
                print(f"denials-to-alert: webhook failed: {e}", file=sys.stderr)
        if args.command:
            subprocess.run(args.command, input=body, check=False)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
