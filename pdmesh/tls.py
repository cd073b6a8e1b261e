"""TLS, and mTLS, on every internal gRPC hop: the files, the credentials, a dev CA.

A process's TLS material is what its command set with `configure()` (from --tls-dir /
--tls-cert / --tls-key / --tls-ca, or PDMESH_TLS_CERT / _KEY / _CA); a process that never
called it (a test, a library user) reads those variables. No material: plaintext (the
default).

- `--tls-cert` + `--tls-key`: this process's certificate. Its servers present it, and its
  client channels present it to servers that ask for a client certificate.
- `--tls-ca`: the CA bundle peers are verified against. A server given one requires a
  client certificate signed by it (mTLS), and that identity is the cluster credential
  (pdmesh/auth.py skips the token check on such a server). Without it, client channels
  verify servers against the system's roots and servers ask for no client certificate.
- The gateway's public ports (gRPC pdmesh.v1.Gateway, REST) serve TLS with the same
  certificate but never require a client certificate: API keys guard them.

`load()` checks everything at start so that a mistake is one line naming the file
(TLSError), not a failed handshake later: files readable, PEM that parses, the key
matching the certificate, the certificate within its validity period.

`mint_dev_ca(dir)` (`pdmesh dev-ca DIR`) writes a throw-away CA and certificates for a
mesh on one machine; see its docstring.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdmesh.config import AuthConfig, auth_config_from_env

# the files `pdmesh dev-ca DIR` writes and `--tls-dir DIR` reads
CA_FILE, CA_KEY_FILE = "ca.pem", "ca-key.pem"
SERVER_CERT, SERVER_KEY = "server.pem", "server-key.pem"
CLIENT_CERT, CLIENT_KEY = "client.pem", "client-key.pem"


class TLSError(ValueError):
    """A TLS file is missing, unreadable, malformed or inconsistent; str() is one line."""


@dataclass(frozen=True)
class TLSMaterial:
    """The PEM bytes one process uses (and the paths they came from, for aiohttp)."""

    cert_file: str | None
    key_file: str | None
    ca_file: str | None
    cert: bytes | None = None  # chain, leaf first
    key: bytes | None = None
    ca: bytes | None = None

    @property
    def has_identity(self) -> bool:
        """True when this process has a certificate (can serve TLS, can do mTLS)."""
        return self.cert is not None

    @property
    def mutual(self) -> bool:
        """True when servers require client certificates (a CA was given)."""
        return self.ca is not None


def dir_files(tls_dir: str) -> tuple[str, str, str]:
    """(cert, key, ca) paths in a `pdmesh dev-ca` folder."""
    d = Path(tls_dir)
    return str(d / SERVER_CERT), str(d / SERVER_KEY), str(d / CA_FILE)


def _read(path: str, flag: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise TLSError(f"cannot read {flag} {path}: {e.strerror or e}") from None
    if b"-----BEGIN " not in data:
        raise TLSError(f"{flag} {path} is not a PEM file")
    return data


def _certs(data: bytes, path: str, flag: str) -> list[Any]:
    from cryptography import x509

    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise TLSError(f"{flag} {path} holds no valid PEM certificate ({e})") from None
    return certs


def _check_validity(cert: Any, path: str, flag: str) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    if now < cert.not_valid_before_utc:
        raise TLSError(f"{flag} {path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    if now > cert.not_valid_after_utc:
        raise TLSError(f"{flag} {path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")


def _check_key(key_pem: bytes, cert: Any, key_path: str, cert_path: str) -> None:
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:  # TypeError: the key is encrypted
        raise TLSError(f"--tls-key {key_path} is not an unencrypted PEM private key "
                       f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise TLSError(f"--tls-key {key_path} does not match --tls-cert {cert_path} "
                       "(the key is not the certificate's)")


def load(config: AuthConfig) -> TLSMaterial | None:
    """The TLS material `config` names, checked; None when it names none (plaintext).
    TLSError (one line) on any problem."""
    cert_file, key_file, ca_file = config.tls_cert, config.tls_key, config.tls_ca
    if not (cert_file or key_file or ca_file):
        return None
    if bool(cert_file) != bool(key_file):
        raise TLSError("--tls-cert and --tls-key go together (env PDMESH_TLS_CERT, "
                       "PDMESH_TLS_KEY)")
    cert = key = ca = None
    if cert_file:
        cert = _read(cert_file, "--tls-cert")
        leaf = _certs(cert, cert_file, "--tls-cert")[0]
        _check_validity(leaf, cert_file, "--tls-cert")
        key = _read(key_file, "--tls-key")
        _check_key(key, leaf, key_file, cert_file)
    if ca_file:
        ca = _read(ca_file, "--tls-ca")
        for c in _certs(ca, ca_file, "--tls-ca"):
            _check_validity(c, ca_file, "--tls-ca")
    return TLSMaterial(cert_file, key_file, ca_file, cert, key, ca)


def require_server_identity(material: TLSMaterial | None) -> None:
    """TLSError when a server was given a CA but no certificate of its own."""
    if material is not None and not material.has_identity:
        raise TLSError("a server needs --tls-cert and --tls-key to serve TLS "
                       "(--tls-ca alone only sets whom it trusts)")


# ---- this process's material ----------------------------------------------------------
class _Unset:
    def __repr__(self) -> str:
        return "PROCESS"


PROCESS: Any = _Unset()  # "this process's material" (the default of every `tls` argument)
_configured: Any = PROCESS


def configure(material: TLSMaterial | None) -> None:
    """Set this process's material (None: plaintext); service commands call it at start."""
    global _configured
    _configured = material


def current() -> TLSMaterial | None:
    """This process's material: the configured one, else loaded (once) from PDMESH_TLS_*."""
    global _configured
    if _configured is PROCESS:
        _configured = load(auth_config_from_env())
    return _configured


def resolve(material: Any) -> TLSMaterial | None:
    return current() if material is PROCESS else material


# ---- gRPC and aiohttp credentials ------------------------------------------------------
def server_credentials(material: TLSMaterial, *, public: bool = False) -> Any:
    """grpc server credentials: mTLS (a client certificate signed by the CA required)
    when the material has a CA and the server is not `public` (the gateway)."""
    import grpc

    require_server_identity(material)
    mutual = material.mutual and not public
    return grpc.ssl_server_credentials([(material.key, material.cert)],
                                       root_certificates=material.ca if mutual else None,
                                       require_client_auth=mutual)


def channel_credentials(material: TLSMaterial) -> Any:
    """grpc channel credentials: verify the server against the CA (else the system's
    roots), present this process's certificate when it has one."""
    import grpc

    return grpc.ssl_channel_credentials(root_certificates=material.ca,
                                        private_key=material.key,
                                        certificate_chain=material.cert)


def ssl_server_context(material: TLSMaterial) -> Any:
    """An ssl.SSLContext for the gateway's REST port (no client certificate asked)."""
    import ssl

    require_server_identity(material)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(material.cert_file, material.key_file)
    return ctx


def unavailable_hint(code_name: str) -> str:
    """What to add to an UNAVAILABLE error about a peer: a TLS mismatch fails this way
    (a handshake the other side closed), indistinguishable from a dead peer."""
    if code_name != "UNAVAILABLE":
        return ""
    m = current()
    if m is None:
        return " (if that port serves TLS, give this process the mesh's --tls-* flags)"
    return (" (TLS: check that the peer serves TLS, that its certificate chains to "
            f"--tls-ca{'' if m.mutual else ' or the system roots'} and names the address "
            "dialed, and that it trusts this process's certificate)")


# ---- a dev CA --------------------------------------------------------------------------
def mint_dev_ca(out_dir: str | os.PathLike, hosts: list[str] | tuple[str, ...] = (),
                days: int = 365) -> dict[str, Path]:
    """Write a throw-away CA and two certificates it signed into `out_dir`:

    - ca.pem, ca-key.pem: the CA (EC P-256). Keep ca-key.pem private, or delete it.
    - server.pem, server-key.pem: every mesh service's certificate (serverAuth and
      clientAuth: each service is a server and a client of the others), SANs localhost,
      127.0.0.1, ::1 and `hosts` (names or IP addresses peers dial).
    - client.pem, client-key.pem: a client-only certificate for tools (clientAuth).

    Keys are written 0600. Existing files are overwritten. Returns name -> path.
    """
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pdmesh dev"),
                          x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def builder(subject: x509.Name, issuer: x509.Name, key: Any) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(end))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("pdmesh dev CA")
    ca = (builder(ca_name, ca_name, ca_key)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, usages: list, sans: list[str]) -> tuple[Any, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        b = (builder(name(cn), ca_name, key)
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                 ca_key.public_key()), critical=False))
        if sans:
            alt: list[x509.GeneralName] = []
            for h in sans:
                try:
                    alt.append(x509.IPAddress(ipaddress.ip_address(h)))
                except ValueError:
                    alt.append(x509.DNSName(h))
            b = b.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        return key, b.sign(ca_key, hashes.SHA256())

    sans = list(dict.fromkeys(["localhost", "127.0.0.1", "::1", *hosts]))
    server_key, server = leaf("pdmesh node", [ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH], sans)
    client_key, client = leaf("pdmesh client", [ExtendedKeyUsageOID.CLIENT_AUTH], [])

    def write(fname: str, data: bytes, private: bool = False) -> Path:
        path = out / fname
        if private:  # created 0600 before any byte is written
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        else:
            path.write_bytes(data)
        return path

    pem = serialization.Encoding.PEM

    def key_pem(k: Any) -> bytes:
        return k.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())

    return {"ca": write(CA_FILE, ca.public_bytes(pem)),
            "ca_key": write(CA_KEY_FILE, key_pem(ca_key), private=True),
            "server": write(SERVER_CERT, server.public_bytes(pem)),
            "server_key": write(SERVER_KEY, key_pem(server_key), private=True),
            "client": write(CLIENT_CERT, client.public_bytes(pem)),
            "client_key": write(CLIENT_KEY, key_pem(client_key), private=True)}
