"""A throw-away OpenLDAP slapd for the tests: its own slapd.conf and mdb database in a temp dir, on free ports.

Debian's `slapd` and `ldap-utils` (.ci/run installs them). Nothing of the system's LDAP configuration is
read or touched; slapd runs as the current user (root in CI) and is stopped at the end.

    with ldap_server.running() as server:        # or the session fixture `ldap_server` (tests/conftest.py)
        server.ldaps_url                         # "ldaps://127.0.0.1:PORT"  (certificate for 127.0.0.1)
        server.ldap_url                          # "ldap://127.0.0.1:PORT"   (StartTLS offered)
        server.ca_file                           # PEM of the CA that signed the server certificate
        server.connector_config(id="corp", **overrides)   # an LdapConnectorConfig (dict overrides merge)
        server.password_of("alice")              # each test user's password
        server.modify(ldif) / server.delete(dn)  # change the directory as its manager (ldapmodify)
        server.user_dn("alice")                  # "uid=alice,ou=people,dc=example,dc=test"
        with server.stopped(): ...               # the server is down inside, back up (same data) after
        with server.paused(): ...                # slapd frozen (SIGSTOP): connections hang, then it resumes

The directory (BASE_DN dc=example,dc=test):
- ou=services: cn=iam, the service account (SERVICE_DN / SERVICE_PASSWORD), may read people and groups.
- ou=people: alice (Alice Liddell, alice@example.test), bob, carol (locked: ppolicy pwdAccountLockedTime
  000001010000Z, an administrative lock), `special(*)\\` (a uid with RFC 4515 specials), many (member of
  MANY_GROUPS groups). Passwords: PASSWORDS. Each person has an entryUUID.
- ou=groups (groupOfNames, `member`): engineering {alice}, staff {engineering, bob}, everyone {staff} (so alice
  is in engineering, staff and everyone when nested), ops {bob}, loop-a {alice, loop-b}, loop-b {loop-a} (a
  cycle), bulk-0000 .. bulk-NNNN {many}; auditors (groupOfUniqueNames, `uniqueMember`) {alice}.
- alice and bob carry `memberOf` (the memberof overlay's attribute, as AD keeps it) of their direct groups.
- The ppolicy overlay answers binds of locked accounts with its accountLocked control (RFC draft-behera).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path

from tests.server import terminate

BASE_DN = "dc=example,dc=test"
MANAGER_DN = f"cn=manager,{BASE_DN}"
MANAGER_PASSWORD = "manager-secret-4kQ9"
SERVICE_DN = f"cn=iam,ou=services,{BASE_DN}"
SERVICE_PASSWORD = "service-secret-Zr7w"
PASSWORDS = {
    "alice": "alice-pw-Wonderland-1",
    "bob": "bob-pw-Builder-2",
    "carol": "carol-pw-Locked-3",
    "special(*)\\": "special-pw-Escaped-4",
    "many": "many-pw-Groups-5",
}
MANY_GROUPS = 1500
SLAPD = "/usr/sbin/slapd"
SCHEMA_DIR = Path("/etc/ldap/schema")
MODULE_DIR = Path("/usr/lib/ldap")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ssha(password: str) -> str:
    """{SSHA} as slappasswd makes it: base64(sha1(password + salt) + salt)."""
    salt = os.urandom(8)
    digest = hashlib.sha1(password.encode() + salt).digest()  # noqa: S324 (the scheme slapd checks: test data)
    return "{SSHA}" + base64.b64encode(digest + salt).decode()


def make_ca(directory: Path, name: str) -> tuple[Path, object, object]:
    """A self-signed CA: (PEM path, certificate, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = directory / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, cert, key


def make_server_cert(directory: Path, ca_cert, ca_key) -> tuple[Path, Path]:
    """A server certificate for 127.0.0.1 (and ldap.test), signed by the CA: (cert path, key path)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ldap.test")]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(IPv4Address("127.0.0.1")),
                                                    x509.DNSName("ldap.test")]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = directory / "server.pem", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def _entry(dn: str, **attributes) -> str:
    lines = [f"dn: {dn}"]
    for name, values in attributes.items():
        for value in values if isinstance(values, list) else [values]:
            text = str(value)
            if text != text.strip() or any(c in text for c in "\\*():<") or not text.isascii():
                lines.append(f"{name}:: {base64.b64encode(text.encode()).decode()}")
            else:
                lines.append(f"{name}: {text}")
    return "\n".join(lines) + "\n"


def directory_ldif() -> str:
    people, groups = f"ou=people,{BASE_DN}", f"ou=groups,{BASE_DN}"
    user = lambda uid: f"uid={_dn_value(uid)},{people}"  # noqa: E731
    group = lambda cn: f"cn={cn},{groups}"  # noqa: E731
    direct = {"alice": ["engineering", "loop-a"], "bob": ["staff", "ops"]}
    entries = [
        _entry(BASE_DN, objectClass=["dcObject", "organization"], dc="example", o="Example"),
        *(_entry(f"ou={ou},{BASE_DN}", objectClass="organizationalUnit", ou=ou)
          for ou in ("services", "people", "groups", "policies")),
        _entry(SERVICE_DN, objectClass=["applicationProcess", "simpleSecurityObject"], cn="iam",
               userPassword=ssha(SERVICE_PASSWORD)),
        _entry(f"cn=default,ou=policies,{BASE_DN}", objectClass=["device", "pwdPolicy"], cn="default",
               pwdAttribute="userPassword", pwdLockout="TRUE", pwdMaxFailure="0"),
    ]
    names = {"alice": ("Alice", "Liddell"), "bob": ("Bob", "Builder"), "carol": ("Carol", "Locked"),
             "special(*)\\": ("Special", "Characters"), "many": ("Many", "Groups")}
    for uid, (given, family) in names.items():
        extra = {}
        if uid in direct:
            extra["memberOf"] = [group(cn) for cn in direct[uid]]
        if uid == "carol":
            extra["pwdAccountLockedTime"] = "000001010000Z"  # ppolicy: locked until an administrator unlocks
        mail = f"{uid}@example.test" if uid.isalnum() else "special@example.test"
        entries.append(_entry(user(uid), objectClass="inetOrgPerson", uid=uid, cn=f"{given} {family}",
                              givenName=given, sn=family, mail=mail, userPassword=ssha(PASSWORDS[uid]), **extra))
    members = {"engineering": [user("alice")], "staff": [group("engineering"), user("bob")],
               "everyone": [group("staff")], "ops": [user("bob")], "loop-a": [user("alice"), group("loop-b")],
               "loop-b": [group("loop-a")]}
    entries += [_entry(group(cn), objectClass="groupOfNames", cn=cn, member=member) for cn, member in members.items()]
    entries.append(_entry(group("auditors"), objectClass="groupOfUniqueNames", cn="auditors",
                          uniqueMember=user("alice")))
    entries += [_entry(group(f"bulk-{n:04d}"), objectClass="groupOfNames", cn=f"bulk-{n:04d}", member=user("many"))
                for n in range(MANY_GROUPS)]
    return "\n".join(entries)


def _dn_value(value: str) -> str:
    """RFC 4514 §2.4 escaping of an attribute value in a DN."""
    out = "".join("\\" + c if c in '\\,+"<>;=' else c for c in value)
    return ("\\" + out if out[:1] in "# " else out)


SLAPD_CONF = """\
include {schema}/core.schema
include {schema}/cosine.schema
include {schema}/inetorgperson.schema
include {schema}/nis.schema
pidfile {dir}/slapd.pid
modulepath {modules}
moduleload back_mdb.so
moduleload ppolicy.so
moduleload memberof.so
TLSCACertificateFile {dir}/ca.pem
TLSCertificateFile {dir}/server.pem
TLSCertificateKeyFile {dir}/server.key
sizelimit unlimited

database mdb
suffix "{base}"
rootdn "{manager}"
rootpw {manager_password}
directory {dir}/db
maxsize 268435456
index objectClass,uid,member,uniqueMember,entryUUID eq
overlay ppolicy
ppolicy_default "cn=default,ou=policies,{base}"
ppolicy_use_lockout
overlay memberof
access to attrs=userPassword
  by anonymous auth
  by * none
access to *
  by dn.exact="{service}" read
  by self read
  by * none
"""


@dataclass
class LdapServer:
    workdir: Path
    ldap_port: int = field(default_factory=free_port)
    ldaps_port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    base_dn: str = BASE_DN
    service_dn: str = SERVICE_DN
    service_password: str = SERVICE_PASSWORD
    manager_dn: str = MANAGER_DN
    manager_password: str = MANAGER_PASSWORD
    process: subprocess.Popen | None = None

    @property
    def ldap_url(self) -> str:
        return f"ldap://{self.host}:{self.ldap_port}"

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://{self.host}:{self.ldaps_port}"

    @property
    def ca_file(self) -> Path:
        return self.workdir / "ca.pem"

    @property
    def people_dn(self) -> str:
        return f"ou=people,{self.base_dn}"

    @property
    def groups_dn(self) -> str:
        return f"ou=groups,{self.base_dn}"

    def user_dn(self, uid: str) -> str:
        return f"uid={_dn_value(uid)},{self.people_dn}"

    @staticmethod
    def password_of(uid: str) -> str:
        return PASSWORDS[uid]

    def connector_config(self, **overrides):
        """An LdapConnectorConfig for this server over ldaps, with the service account; `overrides` merge in
        (nested dicts such as user_search / group_search are merged key by key)."""
        from iam.config import LdapConnectorConfig

        data = {
            "id": "corp-ldap", "type": "ldap", "name": "Example Directory", "url": self.ldaps_url,
            "ca_file": str(self.ca_file), "bind_dn": self.service_dn, "bind_password": self.service_password,
            "user_search": {"base_dn": self.people_dn, "filter": "(&(objectClass=inetOrgPerson)(uid={username}))"},
            "group_search": {"base_dn": self.groups_dn, "filter": "(member={dn})", "name_attribute": "cn"},
            "timeout": 5,
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        return LdapConnectorConfig.model_validate(data)

    # -- changing the directory, as its manager ---------------------------------------------------------
    def _as_manager(self, tool: str, *args: str, stdin: str | None = None) -> str:
        done = subprocess.run([tool, "-x", "-H", self.ldap_url, "-D", self.manager_dn, "-w", self.manager_password,
                               *args], input=stdin, capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed: {done.stderr.strip()}")
        return done.stdout

    def modify(self, ldif: str) -> None:
        """ldapmodify: an LDIF change (changetype: add / modify / delete)."""
        self._as_manager("ldapmodify", stdin=ldif)

    def delete(self, dn: str) -> None:
        self._as_manager("ldapdelete", dn)

    # -- the process ----------------------------------------------------------------------------------------
    def start(self) -> None:
        log = open(self.workdir / "slapd.log", "ab")  # noqa: SIM115 (kept by the process)
        self.process = subprocess.Popen(
            [SLAPD, "-f", str(self.workdir / "slapd.conf"), "-h", f"{self.ldap_url} {self.ldaps_url}", "-d", "0"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("slapd exited: " + (self.workdir / "slapd.log").read_text(errors="replace")[-2000:])
            if self._answers():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError("slapd did not answer within 20 s")

    def _answers(self) -> bool:
        try:
            with socket.create_connection((self.host, self.ldap_port), timeout=0.5):
                pass
        except OSError:
            return False
        done = subprocess.run(["ldapsearch", "-x", "-H", self.ldap_url, "-b", "", "-s", "base", "-LLL", "1.1"],
                              capture_output=True, timeout=5)
        return done.returncode == 0

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            terminate(self.process)
        self.process = None

    @contextmanager
    def paused(self) -> Iterator[None]:
        """slapd frozen (SIGSTOP) inside the block: connections are accepted by the kernel, nothing answers."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.process.send_signal(signal.SIGCONT)

    @contextmanager
    def stopped(self) -> Iterator[None]:
        """The server is down inside the block (its ports refuse connections), and up again after."""
        self.stop()
        try:
            yield
        finally:
            self.start()


def prepare(workdir: Path) -> LdapServer:
    """Certificates, slapd.conf and the loaded database in `workdir`; not started."""
    _, ca_cert, ca_key = make_ca(workdir, "ca")
    make_server_cert(workdir, ca_cert, ca_key)
    (workdir / "db").mkdir()
    (workdir / "slapd.conf").write_text(SLAPD_CONF.format(
        schema=SCHEMA_DIR, modules=MODULE_DIR, dir=workdir, base=BASE_DN, manager=MANAGER_DN,
        manager_password=MANAGER_PASSWORD, service=SERVICE_DN))
    (workdir / "directory.ldif").write_text(directory_ldif())
    done = subprocess.run(["/usr/sbin/slapadd", "-q", "-f", str(workdir / "slapd.conf"),
                           "-l", str(workdir / "directory.ldif")], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"slapadd failed: {done.stderr.strip()}")
    return LdapServer(workdir)


@contextmanager
def running() -> Iterator[LdapServer]:
    """A started server with the test directory; stopped and removed afterwards."""
    if not os.access(SLAPD, os.X_OK):
        raise RuntimeError("OpenLDAP's slapd is not installed (Debian: apt-get install slapd ldap-utils)")
    workdir = Path(tempfile.mkdtemp(prefix="iam-slapd-"))
    try:
        server = prepare(workdir)
        server.start()
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
