"""An aiosmtpd upstream for the interop tests: TLS (implicit or required
STARTTLS) and required AUTH, writing what it receives to files.

Usage: aiosmtpd_upstream.py DIR MODE CERT KEY USER
MODE is "implicit" or "starttls"; the password is in AIOSMTPD_PASSWORD.
The server listens on 127.0.0.1 on a port the kernel picks and writes
that port to DIR/port once it accepts connections. Each accepted message
becomes DIR/msg-N.json and each AUTH attempt DIR/auth-N.json, both written
through a temporary name and a rename so that a reader never sees half.
"""

import asyncio
import base64
import itertools
import json
import os
import ssl
import sys

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword


def write_json(directory, name, obj):
    tmp = os.path.join(directory, "." + name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.rename(tmp, os.path.join(directory, name))


class Recorder:
    def __init__(self, directory, user, password):
        self.dir = directory
        self.user = user.encode()
        self.password = password.encode()
        self.msgs = itertools.count(1)
        self.auths = itertools.count(1)

    def authenticate(self, server, session, envelope, mechanism, auth_data):
        ok = (isinstance(auth_data, LoginPassword)
              and auth_data.login == self.user
              and auth_data.password == self.password)
        login = auth_data.login.decode("utf-8", "replace") if isinstance(auth_data, LoginPassword) else ""
        write_json(self.dir, "auth-%d.json" % next(self.auths),
                   {"mechanism": mechanism, "login": login, "success": ok})
        # handled=False lets aiosmtpd send its own 535 on failure; on
        # success auth_data becomes session.auth_data, read by handle_DATA.
        return AuthResult(success=ok, handled=False, auth_data=auth_data)

    async def handle_DATA(self, server, session, envelope):
        login = ""
        if isinstance(session.auth_data, LoginPassword):
            login = session.auth_data.login.decode("utf-8", "replace")
        write_json(self.dir, "msg-%d.json" % next(self.msgs), {
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "data": base64.b64encode(envelope.original_content).decode(),
            "auth_login": login,
            "tls": server.transport.get_extra_info("sslcontext") is not None,
        })
        return "250 2.0.0 OK stored"


async def serve(directory, mode, cert, key, user):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    rec = Recorder(directory, user, os.environ["AIOSMTPD_PASSWORD"])
    starttls = mode == "starttls"

    def factory():
        return SMTP(
            rec,
            hostname="aiosmtpd.test",
            authenticator=rec.authenticate,
            auth_required=True,
            # aiosmtpd 1.4 counts only STARTTLS as TLS for this check;
            # with implicit TLS every byte is already protected.
            auth_require_tls=starttls,
            tls_context=ctx if starttls else None,
            require_starttls=starttls,
        )

    loop = asyncio.get_running_loop()
    server = await loop.create_server(factory, "127.0.0.1", 0, ssl=None if starttls else ctx)
    port = server.sockets[0].getsockname()[1]
    write_json(directory, "port", port)
    async with server:
        await server.serve_forever()


def main():
    if len(sys.argv) != 6:
        sys.exit(__doc__)
    asyncio.run(serve(*sys.argv[1:6]))


if __name__ == "__main__":
    main()
