"""Preflight, on the controller: can the proxy serve this TLS certificate with this key?

Reads ``{"cert": PEM, "key": PEM}`` as JSON on standard input (the role reads the files, so ansible-vault encrypted
ones arrive decrypted and never touch the disk unencrypted outside a private temporary directory). Exit 0 and print
the certificate's expiry when they fit; exit 1 and print why not: the key does not belong to the certificate, is
encrypted, either is not PEM, or the certificate has expired or is not valid yet. Never prints the key.
"""

import datetime as dt
import json
import os
import ssl
import sys
import tempfile

from cryptography import x509  # a dependency of ansible-core itself


class PassphraseWanted(Exception):
    """OpenSSL would prompt on the terminal for the key's passphrase; the proxy cannot answer that either."""


def no_passphrase() -> str:
    raise PassphraseWanted


def problem(doc: dict[str, str]) -> str | None:
    with tempfile.TemporaryDirectory() as tmp:  # mode 0700
        paths = {}
        for name in ("cert", "key"):
            paths[name] = os.path.join(tmp, name)
            with open(os.open(paths[name], os.O_WRONLY | os.O_CREAT, 0o600), "w", encoding="ascii") as f:
                f.write(doc[name] + "\n")
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(paths["cert"], paths["key"], no_passphrase)
        except PassphraseWanted:
            return ("appliance_tls_key_src is encrypted with a passphrase, which the proxy cannot ask for: store it "
                    "unencrypted (openssl pkey -in KEY -out NEW_FILE) and encrypt that file with ansible-vault")
        except ssl.SSLError as e:
            if e.reason == "KEY_VALUES_MISMATCH":
                return ("appliance_tls_key_src is not the private key of the certificate in appliance_tls_cert_src: "
                        "use the key the certificate was issued for")
            return (f"appliance_tls_cert_src and appliance_tls_key_src must be a PEM certificate chain (server "
                    f"certificate first) and its PEM private key: {e.reason or e}")
    cert = x509.load_pem_x509_certificate(doc["cert"].encode())
    now = dt.datetime.now(dt.UTC)
    if cert.not_valid_after_utc <= now:
        return f"appliance_tls_cert_src expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: renew it"
    if cert.not_valid_before_utc > now:
        return (f"appliance_tls_cert_src is valid only from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC: "
                "clients would refuse it until then")
    print(f"valid until {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    return None


if __name__ == "__main__":
    why = problem(json.load(sys.stdin))
    if why:
        print(why)
    sys.exit(1 if why else 0)
