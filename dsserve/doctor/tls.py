"""Doctor checks of `dsserve serve`'s TLS files: present, parsable, the key matching the certificate, in date."""

from __future__ import annotations

import datetime
from typing import Any

from dsserve.doctor.files import Line, read_bytes, secret_permissions

EXPIRY_WARNING_DAYS = 30
CERT_REQS = {0: "no client certificate", 1: "client certificate optional", 2: "client certificate required"}


def check_tls(options: dict[str, Any], now: datetime.datetime | None = None) -> list[Line]:
    """Lines for ssl_certfile / ssl_keyfile / ssl_ca_certs / ssl_cert_reqs; none when TLS is not configured."""
    certfile, keyfile, ca_file = options.get("ssl_certfile"), options.get("ssl_keyfile"), options.get("ssl_ca_certs")
    cert_reqs = options.get("ssl_cert_reqs", 0)
    if not (certfile or keyfile):
        if ca_file or cert_reqs:
            return [(False, "TLS: ssl_ca_certs / ssl_cert_reqs are set but TLS is off; give --ssl-certfile and "
                            "--ssl-keyfile too (uvicorn ignores the client-certificate options without them)")]
        return []
    lines: list[Line] = []
    if not (certfile and keyfile):
        given, missing = ("--ssl-certfile", "--ssl-keyfile") if certfile else ("--ssl-keyfile", "--ssl-certfile")
        lines.append((False, f"TLS: {given} is set without {missing}; HTTPS needs both the certificate and its "
                             f"private key"))
    now = now or datetime.datetime.now(datetime.timezone.utc)
    chain = _certificates(str(certfile), lines, now) if certfile else None
    key = _private_key(str(keyfile), lines) if keyfile else None
    if chain and key is not None:
        lines.append(_key_matches(chain[0], key, str(keyfile), str(certfile)))
    lines += _client_certificates(cert_reqs, str(ca_file) if ca_file else None, chain)
    return lines


def _certificates(path: str, lines: list[Line], now: datetime.datetime) -> list | None:
    """The server certificate and any intermediates after it; appends the parse and expiry lines."""
    from cryptography import x509

    data, failure = read_bytes(path, "--ssl-certfile")
    if data is None:
        lines.append(failure)
        return None
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError:
        lines.append((False, f"--ssl-certfile {path} " + (
            "holds a private key, not a certificate: are --ssl-keyfile and --ssl-certfile swapped?"
            if b"PRIVATE KEY-----" in data else "holds no PEM certificate (-----BEGIN CERTIFICATE-----); convert a "
            f"DER file with `openssl x509 -inform der -in {path} -out {path}.pem`")))
        return None
    cert = chain[0]
    what = f"--ssl-certfile {path}: certificate for {_names(cert)}" + (
        f" (+{len(chain) - 1} intermediate(s))" if len(chain) > 1 else "")
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < start:
        lines.append((False, f"{what} is not valid until {start:%Y-%m-%d %H:%M} UTC; check this machine's clock or "
                             f"reissue it"))
    elif now >= end:
        lines.append((False, f"{what} expired on {end:%Y-%m-%d} ({(now - end).days} day(s) ago); renew it"))
    else:
        days = (end - now).days
        lines.append((True, f"{what}, issued by {cert.issuer.rfc4514_string()}, expires in {days} day(s) "
                            f"({end:%Y-%m-%d})"))
        if days < EXPIRY_WARNING_DAYS:
            lines.append((None, f"warning: the certificate in {path} expires in {days} day(s); renew it before "
                                f"{end:%Y-%m-%d}"))
    return chain


def _private_key(path: str, lines: list[Line]) -> Any | None:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    data, failure = read_bytes(path, "--ssl-keyfile")
    if data is None:
        lines.append(failure)
        return None
    warning = secret_permissions(path, "--ssl-keyfile", "the TLS private key")
    if warning:
        lines.append(warning)
    try:
        key = load_pem_private_key(data, password=None)
    except TypeError:  # cryptography: "Password was not given but private key is encrypted"
        lines.append((False, f"--ssl-keyfile {path} is encrypted: uvicorn would need its password and dsserve passes "
                             f"none; decrypt it (openssl pkey -in {path} -out KEY.pem, then chmod 600 KEY.pem)"))
        return None
    except (ValueError, UnsupportedAlgorithm):  # never echo the error: it could quote the key
        swapped = b"-----BEGIN CERTIFICATE-----" in data and b"PRIVATE KEY-----" not in data
        lines.append((False, f"--ssl-keyfile {path} " + (
            "holds a certificate, not a private key: are --ssl-keyfile and --ssl-certfile swapped?" if swapped else
            "holds no PEM private key (-----BEGIN PRIVATE KEY-----) that can be read")))
        return None
    lines.append((True, f"--ssl-keyfile {path}: {_key_kind(key)} private key"))
    return key


def _key_matches(cert: Any, key: Any, keyfile: str, certfile: str) -> Line:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    def der(public_key: Any) -> bytes:
        return public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)

    if der(cert.public_key()) == der(key.public_key()):
        return True, f"the private key in {keyfile} matches the certificate in {certfile}"
    return False, (f"the private key in {keyfile} does not match the certificate in {certfile} (different public "
                   f"keys); give the key the certificate was issued for")


def _client_certificates(cert_reqs: Any, ca_file: str | None, chain: list | None) -> list[Line]:
    """ssl_ca_certs is what uvicorn checks *client* certificates against, as ssl_cert_reqs asks."""
    from cryptography import x509

    if isinstance(cert_reqs, bool) or cert_reqs not in CERT_REQS:
        return [(False, f"ssl_cert_reqs must be 0 ({CERT_REQS[0]}), 1 (optional) or 2 (required), got {cert_reqs!r}")]
    if ca_file is None:
        if cert_reqs == 2:
            return [(False, "ssl_cert_reqs = 2 requires client certificates but no --ssl-ca-certs is given to check "
                            "them against: every client would be refused")]
        if cert_reqs == 1:
            return [(None, "warning: ssl_cert_reqs = 1 without --ssl-ca-certs: clients presenting a certificate "
                           "would be refused")]
        return []
    data, failure = read_bytes(ca_file, "--ssl-ca-certs")
    if data is None:
        return [failure]
    try:
        cas = x509.load_pem_x509_certificates(data)
    except ValueError:
        return [(False, f"--ssl-ca-certs {ca_file} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")]
    lines: list[Line] = [(True, f"--ssl-ca-certs {ca_file}: {len(cas)} CA certificate(s); {CERT_REQS[cert_reqs]} "
                                f"(ssl_cert_reqs = {cert_reqs})")]
    if cert_reqs == 0:
        lines.append((None, f"--ssl-ca-certs {ca_file} is loaded but ssl_cert_reqs is 0, so clients are never asked "
                            f"for a certificate; set ssl_cert_reqs = 2 for mutual TLS"))
    if chain:
        issuer = _issuing_ca(chain, cas)
        lines.append((True, f"the server certificate chains to {issuer.subject.rfc4514_string()} in {ca_file}")
                     if issuer is not None else
                     (None, f"the server certificate (issuer {chain[0].issuer.rfc4514_string()}) does not chain to a "
                            f"CA in {ca_file}; fine if that file is only for client certificates, else check the pair"))
    return lines


def _issuing_ca(chain: list, cas: list) -> Any | None:
    """The CA in `cas` that signed the server certificate, directly or through the chain's intermediates."""
    cert, intermediates = chain[0], chain[1:]
    for _ in range(len(intermediates) + 1):
        ca = next((ca for ca in cas if _is_issued_by(cert, ca)), None)
        if ca is not None:
            return ca
        cert = next((c for c in intermediates if _is_issued_by(cert, c)), None)
        if cert is None:
            return None
    return None


def _is_issued_by(cert: Any, issuer: Any) -> bool:
    """The issuer name matches and the issuer's key verifies the signature."""
    from cryptography.exceptions import InvalidSignature

    try:
        cert.verify_directly_issued_by(issuer)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


def _key_kind(key: Any) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if isinstance(key, rsa.RSAPrivateKey):
        return f"RSA {key.key_size}-bit"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"EC {key.curve.name}"
    return type(key).__name__.lstrip("_").replace("PrivateKey", "")


def _names(cert: Any) -> str:
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n) for n in san.get_values_for_type(x509.DNSName) + san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        names = []
    if not names:
        names = [a.value for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
    return ", ".join(names) or cert.subject.rfc4514_string()
