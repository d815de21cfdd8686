"""Checks of the proxy's TLS certificate and key, with the standard library only (no X.509 package on the hosts)."""

from __future__ import annotations

import datetime as dt
import re
import ssl
from pathlib import Path

_PEM_CERT = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)
_PEM_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")
# Days before notAfter from which the appliance warns that the certificate needs renewing.
EXPIRY_WARNING_DAYS = 14


class _PassphraseWanted(Exception):
    """Raised from the password callback: OpenSSL would otherwise prompt on the terminal and block."""


def _no_passphrase() -> str:
    raise _PassphraseWanted


def _der_item(der: bytes, pos: int) -> tuple[int, int, int]:
    """Tag, start and end of the contents of the DER item at ``pos``."""
    tag, length = der[pos], der[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        length, pos = int.from_bytes(der[pos:pos + n], "big"), pos + n
    if pos + length > len(der):
        raise ValueError("truncated DER item")
    return tag, pos, pos + length


def _der_time(tag: int, text: str) -> dt.datetime:
    if tag == 0x17:  # UTCTime, YYMMDDHHMMSSZ; RFC 5280: YY >= 50 is 19YY
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    elif tag != 0x18:  # GeneralizedTime, YYYYMMDDHHMMSSZ
        raise ValueError(f"unexpected time tag {tag:#x}")
    return dt.datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=dt.UTC)


def certificate_validity(pem: str) -> tuple[dt.datetime, dt.datetime]:
    """notBefore and notAfter of the first certificate of a PEM chain (the server's own). Raises ValueError.

    The ``ssl`` module loads certificates but does not parse them; the validity sits at a fixed place in the DER
    (RFC 5280: tbsCertificate = [0] version, serialNumber, signature, issuer, validity, ...)."""
    match = _PEM_CERT.search(pem)
    if not match:
        raise ValueError("no PEM certificate (-----BEGIN CERTIFICATE-----)")
    try:
        der = ssl.PEM_cert_to_DER_cert(match.group())
        _, pos, _ = _der_item(der, 0)  # Certificate
        _, pos, _ = _der_item(der, pos)  # tbsCertificate
        tag, _, end = _der_item(der, pos)
        if tag == 0xA0:  # explicit version
            pos = end
        for _ in range(3):  # serialNumber, signature, issuer
            pos = _der_item(der, pos)[2]
        _, pos, _ = _der_item(der, pos)  # validity
        times = []
        for _ in range(2):
            tag, start, end = _der_item(der, pos)
            times.append(_der_time(tag, der[start:end].decode("ascii")))
            pos = end
    except (IndexError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"not a readable X.509 certificate ({e})") from e
    return times[0], times[1]


def check_pair(cert: Path, key: Path) -> list[tuple[str, str]]:
    """Problems of a certificate chain and key that the proxy would serve, as ``(config key, reason)``: unreadable or
    not PEM, an encrypted key, or a key that does not belong to the certificate."""
    problems: list[tuple[str, str]] = []
    texts: dict[str, str] = {}
    for name, path in (("server.tls_cert_file", cert), ("server.tls_key_file", key)):
        try:
            texts[name] = path.read_text(encoding="ascii", errors="replace")
        except OSError as e:
            problems.append((name, f"cannot read {path}: {e.strerror} (the proxy runs as the service user, which "
                                   "must be able to read it too)"))
    if problems:
        return problems
    try:
        certificate_validity(texts["server.tls_cert_file"])
    except ValueError as e:
        problems.append(("server.tls_cert_file", f"{cert}: {e}; it must hold the server's certificate in PEM, "
                                                 "followed by any intermediate CA certificates"))
    if not _PEM_KEY.search(texts["server.tls_key_file"]):
        problems.append(("server.tls_key_file", f"{key} holds no PEM private key (-----BEGIN PRIVATE KEY-----)"))
    if problems:
        return problems
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=_no_passphrase)
    except _PassphraseWanted:
        problems.append(("server.tls_key_file", f"{key} is encrypted with a passphrase, which the proxy cannot ask "
                                                f"for: store it unencrypted (openssl pkey -in {key} -out NEW_FILE), "
                                                "readable only by root and the service's group"))
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            problems.append(("server.tls_key_file", f"{key} is not the private key of the certificate in "
                                                    f"server.tls_cert_file ({cert}): install the key the certificate "
                                                    "was issued for, or a certificate issued for this key"))
        else:
            problems.append(("server.tls_key_file", f"{key} cannot be used with {cert}: {e.reason or e}"))
    return problems


def validity_warning(cert: Path, now: dt.datetime) -> str | None:
    """Why clients will soon refuse (or already refuse) the certificate, or None while it is well within its dates."""
    try:
        not_before, not_after = certificate_validity(cert.read_text(encoding="ascii", errors="replace"))
    except (OSError, ValueError):
        return None  # the config's validation reports an unreadable certificate
    fix = "renew it, replace the file in place and run `appliance reload`"
    if not_after <= now:
        return f"{cert} expired on {not_after:%Y-%m-%d %H:%M} UTC: clients that verify certificates refuse it; {fix}"
    if not_before > now:
        return (f"{cert} is valid only from {not_before:%Y-%m-%d %H:%M} UTC: clients refuse it until then "
                "(check the host's clock)")
    days = (not_after - now).days
    if days < EXPIRY_WARNING_DAYS:
        return f"{cert} expires on {not_after:%Y-%m-%d %H:%M} UTC (in {days} day(s)); {fix}"
    return None
