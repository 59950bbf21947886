"""Submit one message with Python's smtplib: STARTTLS verified against a
given CA, then AUTH, then send_message.

Usage: smtplib_send.py HOST PORT CAFILE USER FROM TO MARKER
The password comes from the SMTPLIB_PASSWORD environment variable.
"""

import os
import smtplib
import ssl
import sys
from email.message import EmailMessage


def main():
    host, port, cafile, user, sender, rcpt, marker = sys.argv[1:8]
    ctx = ssl.create_default_context(cafile=cafile)
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = rcpt
    msg["Subject"] = "interop smtplib"
    msg.set_content("Sent by Python smtplib.\n" + marker + "\n")
    with smtplib.SMTP(host, int(port), local_hostname="smtplib.test", timeout=30) as s:
        s.starttls(context=ctx)
        s.login(user, os.environ["SMTPLIB_PASSWORD"])
        refused = s.send_message(msg)
        if refused:
            sys.exit("refused recipients: %r" % (refused,))


if __name__ == "__main__":
    main()
