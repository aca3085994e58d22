"""Test PKI for a fedsec consortium: a CA, the SuperLink's TLS certificate, node keys.

Flower 1.41 needs three kinds of credentials for a secure deployment:

* **TLS** between every SuperNode (and the ``flwr`` CLI) and the SuperLink: the
  SuperLink presents a server certificate (``--ssl-certfile`` / ``--ssl-keyfile``,
  plus ``--ssl-ca-certfile``) signed by a CA that the clients trust
  (``--root-certificates`` / ``root-certificates`` in the CLI's ``config.toml``).
  The certificate's subjectAltName must name the address the clients dial:
  ``127.0.0.1`` / ``localhost`` on loopback, the service name (``superlink``) in
  Docker, the public DNS name in a real consortium.
* **SuperNode authentication**: each hospital owns an ECDSA key pair on a NIST curve
  (P-384 here). The private key stays at the hospital
  (``flower-supernode --auth-supernode-private-key``, OpenSSH private-key format);
  the public key (OpenSSH ``ecdsa-sha2-nistp384 ...`` line) is registered at the
  SuperLink with ``flwr supernode register KEY.pub CONNECTION``. A SuperLink started
  with ``--enable-supernode-auth`` refuses any node whose key is not registered
  (the node exits with Flower exit code 305).
* **SuperExec shared secrets** (only when ServerApp / ClientApp executors run in
  their own containers, ``--isolation process``): random bytes read by both the
  SuperLink (or SuperNode) and its executor (``--superexec-auth-secret-file``), so
  that nobody else who can reach the Runtime API can claim a task.

Everything here is for tests and for a consortium's *first* set-up; a production
consortium would use its own CA. Files are written with owner-only permissions
(0600 for keys and secrets, 0644 for certificates and public keys, 0700 for the
folder that holds private material).

Layout written by :func:`make_certificates` (``OUT`` is the folder given)::

    OUT/ca.crt                      CA certificate: give to every site
    OUT/ca.key                      CA private key: keep offline (signs new server certs)
    OUT/superlink.crt               SuperLink server certificate (SANs below)
    OUT/superlink.key               SuperLink TLS private key: SuperLink host only
    OUT/nodes/<name>.key            node private key (OpenSSH): that hospital only
    OUT/nodes/<name>.pub            node public key (OpenSSH): registered at the SuperLink
    OUT/superexec/<name>.secret     SuperExec shared secrets (Docker, process isolation)

Command line::

    python -m fedsec.federation.certs OUT --nodes hospital-0 hospital-1 \
        [--hostname superlink] [--days 365] [--secrets superlink hospital-0 ...] [--force]

(``scripts/make-certs.sh`` wraps the same command.)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import ipaddress
import os
import secrets as _secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from fedsec.errors import FedsecError

# Names every loopback test dials; a Docker / real hostname is added on top.
DEFAULT_DNS_NAMES = ("localhost",)
DEFAULT_IPS = ("127.0.0.1", "::1")


@dataclass(frozen=True)
class NodeKey:
    """One hospital's SuperNode authentication key pair (OpenSSH formats)."""

    name: str
    private_key: Path  # -> flower-supernode --auth-supernode-private-key
    public_key: Path  # -> flwr supernode register <public_key> <connection>


@dataclass(frozen=True)
class CertificateSet:
    """Paths of everything :func:`make_certificates` wrote."""

    root: Path
    ca_cert: Path  # -> --ssl-ca-certfile (SuperLink), --root-certificates (SuperNode, CLI)
    ca_key: Path
    server_cert: Path  # -> flower-superlink --ssl-certfile
    server_key: Path  # -> flower-superlink --ssl-keyfile
    nodes: dict[str, NodeKey] = field(default_factory=dict)
    secrets: dict[str, Path] = field(default_factory=dict)
    hostnames: tuple[str, ...] = ()


# ----------------------------------------------------------------------------- files


def _write(path: Path, data: bytes, mode: int, *, overwrite: bool) -> Path:
    """Write ``data`` to ``path`` created with ``mode`` from the start (no window in
    which a private key is world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        if not overwrite:
            raise FedsecError(
                f"{path} already exists; pass overwrite=True (--force) to replace it"
            )
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(path, mode)  # umask may have removed bits of a public file's mode
    return path


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


# ----------------------------------------------------------------------------- keys


def _new_ec_key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP384R1())


def _pem_private(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedsec consortium"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_ca(days: int = 365, common_name: str = "fedsec test CA"):
    """Return ``(certificate, private_key)`` of a new self-signed CA (ECDSA P-384)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    key = _new_ec_key()
    now = _dt.datetime.now(_dt.timezone.utc)
    name = _name(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return cert, key


def make_server_cert(
    ca_cert,
    ca_key,
    dns_names: Iterable[str] = DEFAULT_DNS_NAMES,
    ips: Iterable[str] = DEFAULT_IPS,
    days: int = 365,
):
    """Return ``(certificate, private_key)`` of a TLS server certificate signed by the CA.

    ``dns_names`` / ``ips`` become the subjectAltName entries: every name a client
    dials must be listed (TLS clients ignore the common name).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    dns_names = list(dict.fromkeys(dns_names))
    ips = list(dict.fromkeys(ips))
    if not dns_names and not ips:
        raise FedsecError("a server certificate needs at least one hostname or IP address")
    alt_names: list = [x509.DNSName(n) for n in dns_names]
    for ip in ips:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError as err:
            raise FedsecError(f"not an IP address: {ip!r}") from err
    key = _new_ec_key()
    now = _dt.datetime.now(_dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(dns_names[0] if dns_names else ips[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    return cert, key


def make_node_key(
    directory: str | os.PathLike, name: str, *, overwrite: bool = False
) -> NodeKey:
    """Write one SuperNode key pair: ``<name>.key`` (OpenSSH private, 0600) and
    ``<name>.pub`` (one ``ecdsa-sha2-nistp384 AAAA... <name>`` line, 0644)."""
    from cryptography.hazmat.primitives import serialization

    _check_name(name)
    directory = _private_dir(Path(directory))
    key = _new_ec_key()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    priv_path = _write(directory / f"{name}.key", private, 0o600, overwrite=overwrite)
    pub_path = _write(
        directory / f"{name}.pub", public + f" {name}\n".encode(), 0o644, overwrite=overwrite
    )
    return NodeKey(name=name, private_key=priv_path, public_key=pub_path)


def make_secret(directory: str | os.PathLike, name: str, *, overwrite: bool = False) -> Path:
    """Write a SuperExec shared secret (32 random bytes, hex, no newline; 0600)."""
    _check_name(name)
    directory = _private_dir(Path(directory))
    return _write(
        directory / f"{name}.secret", _secrets.token_hex(32).encode(), 0o600, overwrite=overwrite
    )


def _check_name(name: str) -> None:
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise FedsecError(
            f"invalid key name {name!r}: use letters, digits, '-', '_' or '.' (e.g. hospital-0)"
        )


def make_certificates(
    out: str | os.PathLike,
    *,
    nodes: Sequence[str] = (),
    hostnames: Sequence[str] = ("superlink",),
    ips: Sequence[str] = DEFAULT_IPS,
    secrets: Sequence[str] = (),
    days: int = 365,
    overwrite: bool = False,
) -> CertificateSet:
    """Write a CA, a SuperLink server certificate, node key pairs and SuperExec secrets.

    ``hostnames`` are added to ``localhost`` in the server certificate's SANs (so the
    same certificate serves loopback tests and a Docker network where the SuperLink
    is reachable as ``superlink``); ``ips`` default to 127.0.0.1 and ::1.
    """
    if days < 1:
        raise FedsecError(f"days must be >= 1, got {days}")
    root = _private_dir(Path(out))
    dns = tuple(dict.fromkeys([*DEFAULT_DNS_NAMES, *hostnames]))
    ca_cert, ca_key = make_ca(days=days)
    server_cert, server_key = make_server_cert(ca_cert, ca_key, dns, ips, days=days)
    paths = dict(
        ca_cert=_write(root / "ca.crt", _pem_cert(ca_cert), 0o644, overwrite=overwrite),
        ca_key=_write(root / "ca.key", _pem_private(ca_key), 0o600, overwrite=overwrite),
        server_cert=_write(
            root / "superlink.crt", _pem_cert(server_cert), 0o644, overwrite=overwrite
        ),
        server_key=_write(
            root / "superlink.key", _pem_private(server_key), 0o600, overwrite=overwrite
        ),
    )
    node_keys = {n: make_node_key(root / "nodes", n, overwrite=overwrite) for n in nodes}
    secret_files = {s: make_secret(root / "superexec", s, overwrite=overwrite) for s in secrets}
    return CertificateSet(
        root=root, nodes=node_keys, secrets=secret_files, hostnames=dns, **paths
    )


def describe(certs: CertificateSet) -> str:
    """A short, human-readable list of what was written and who keeps what."""
    lines = [
        f"Wrote test PKI to {certs.root}",
        f"  {certs.ca_cert}        CA certificate (all sites)",
        f"  {certs.ca_key}        CA key (keep offline)",
        f"  {certs.server_cert}  SuperLink certificate, SANs: "
        + ", ".join([*certs.hostnames, *DEFAULT_IPS]),
        f"  {certs.server_key}  SuperLink TLS key (SuperLink host only)",
    ]
    for nk in certs.nodes.values():
        lines.append(f"  {nk.private_key}  {nk.name} private key ({nk.name} only)")
        lines.append(f"  {nk.public_key}  {nk.name} public key (register at the SuperLink)")
    for name, path in certs.secrets.items():
        lines.append(f"  {path}  SuperExec secret for {name}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedsec.federation.certs",
        description="Write a test CA, a SuperLink TLS certificate, SuperNode key pairs "
        "(ECDSA P-384, OpenSSH format) and SuperExec shared secrets.",
    )
    parser.add_argument("out", help="output folder (created with mode 0700)")
    parser.add_argument(
        "--nodes", nargs="*", default=[], metavar="NAME",
        help="node key pairs to create, e.g. hospital-0 hospital-1",
    )
    parser.add_argument(
        "--hostname", action="append", default=None, metavar="NAME",
        help="extra DNS name in the SuperLink certificate (repeatable; default: superlink)",
    )
    parser.add_argument(
        "--ip", action="append", default=None, metavar="ADDR",
        help="IP address in the SuperLink certificate (repeatable; default: 127.0.0.1 and ::1)",
    )
    parser.add_argument(
        "--secrets", nargs="*", default=[], metavar="NAME",
        help="SuperExec shared secrets to create, e.g. superlink hospital-0",
    )
    parser.add_argument("--days", type=int, default=365, help="validity (default 365)")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    args = parser.parse_args(argv)
    try:
        certs = make_certificates(
            args.out,
            nodes=args.nodes,
            hostnames=args.hostname if args.hostname is not None else ["superlink"],
            ips=args.ip if args.ip is not None else list(DEFAULT_IPS),
            secrets=args.secrets,
            days=args.days,
            overwrite=args.force,
        )
    except FedsecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(describe(certs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
