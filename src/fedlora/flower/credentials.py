"""Certificates and keys for a local Flower deployment (fedlora.flower.deploy): TLS for every
connection to the SuperLink and one authentication key pair per SuperNode, as Flower's
CLI-managed SuperNode authentication wants them (docs/flower.md, Security).

- A throw-away certificate authority (EC P-256, valid one day) signs the SuperLink's server
  certificate for 127.0.0.1 / localhost; nodes and the `flwr` CLI trust only that CA.
- Each SuperNode gets an EC P-384 key pair in OpenSSH format (what `flower-supernode
  --auth-supernode-private-key` and `flwr supernode register` read). The SuperLink runs with
  `--enable-supernode-auth`: only registered public keys may connect.

Private keys are written with mode 0600. Made with the `cryptography` package (a Flower
dependency), not by shelling out to openssl.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKey:
    private_key: Path
    public_key: Path


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_tls(folder: Path, valid_days: int = 1) -> TlsFiles:
    """A CA and a server certificate it signs for 127.0.0.1 and localhost, in `folder`."""
    now = dt.datetime.now(dt.timezone.utc)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=valid_days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedlora local deployment CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    folder = Path(folder)
    return TlsFiles(ca_cert=_write(folder / "ca.crt", ca.public_bytes(serialization.Encoding.PEM)),
                    server_cert=_write(folder / "server.pem", cert.public_bytes(serialization.Encoding.PEM)),
                    server_key=_write(folder / "server.key", _pem_key(key), private=True))


def write_node_key(folder: Path, name: str) -> NodeKey:
    """An EC P-384 key pair for SuperNode authentication: `name` (private, OpenSSH) and `name.pub`."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    folder = Path(folder)
    return NodeKey(private_key=_write(folder / name, private, private=True),
                   public_key=_write(folder / f"{name}.pub", public + b"\n"))


__all__ = ["NodeKey", "TlsFiles", "write_node_key", "write_tls"]
