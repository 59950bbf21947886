"""Verify every DKIM-Signature of a message with dkimpy, an implementation
independent of ours. Usage: dkimverify.py RECORDS.json MESSAGE.eml
RECORDS.json maps "selector._domainkey.domain" to the TXT value; it stands
in for DNS. Prints "verified N" and exits 0 when all N verify, else 1."""
import json
import sys

import dkim

records = json.load(open(sys.argv[1]))
message = open(sys.argv[2], "rb").read()


def dnsfunc(name, timeout=5):
    if isinstance(name, bytes):
        name = name.decode()
    value = records.get(name.rstrip("."))
    return value.encode() if value is not None else None


d = dkim.DKIM(message)
count = sum(1 for k, _ in d.headers if k.lower() == b"dkim-signature")
if count == 0:
    print("no DKIM-Signature")
    sys.exit(1)
for i in range(count):
    if not d.verify(idx=i, dnsfunc=dnsfunc):
        print("signature %d does not verify" % i)
        sys.exit(1)
print("verified %d" % count)
