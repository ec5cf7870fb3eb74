"""Parsing the inventory's settings sections: ``app``, ``database``, ``release``, ``tls``
and ``egress``."""
from __future__ import annotations

import ipaddress
import re
import stat
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from .fields import (_DB_EXPECT, _USER_EXPECT, ACME_KEYS, APP_KEYS, DB_KEYS, EGRESS_ALLOW_KEYS,
                     EGRESS_KEYS, JWT_KEYS, RELEASE_KEYS, STORAGE_KEYS, TLS_KEYS, _Fields)
from .model import (ARCHES, BUCKET_RE, DB_IDENT_RE, DB_KINDS, DEFAULT_DATABASE_MAX_CONNECTIONS,
                    EGRESS_PINS, EMAIL_RE, LETSENCRYPT, LETSENCRYPT_STAGING, LOG_LEVELS,
                    REGION_RE, SHA256_RE, TIERS, TLS_MODES, USER_RE, VERSION_RE, AcmeSettings,
                    AppSettings, ArtifactStorage, DatabaseSettings, EgressAllow, EgressSettings,
                    OperatorJwt, ReleaseSource, TlsSettings)
from .problems import InventoryError, Problem
from .sums import _parse_sums, _read_text
from .values import (_Bad, _bool, _choice, _dns_name, _int, _join, _kind, _pg_major, _regex,
                     _show, _source_text, _text, _url, did_you_mean)


class _SettingsParser(_Fields):
    def egress(self, top: dict[str, Any], app: AppSettings | None,
               tls: TlsSettings | None) -> EgressSettings:
        e = self.section(top, "", "egress", EGRESS_KEYS)
        if e is None:
            return EgressSettings()
        restrict = self.field(e, "egress", "restrict", _bool, False)
        apt_proxy = self.field(e, "egress", "apt_proxy", _url, None)
        if apt_proxy is not None and urlsplit(apt_proxy).scheme != "http":
            self.error("egress.apt_proxy", f"{_show(apt_proxy)}: apt talks to a proxy over "
                                           "plain http (http://HOST:PORT); https sources "
                                           "still work through it (CONNECT)")
        raw = e.get("allow")
        allow: list[EgressAllow] = []
        if raw is not None and not isinstance(raw, list):
            self.error("egress.allow", f"must be a list of {{to, port, proto, tiers}} "
                                       f"entries; got {_kind(raw)}")
            raw = None
        for i, item in enumerate(raw or []):
            entry = self.egress_allow(item, f"egress.allow[{i}]", app, apt_proxy, tls)
            if entry is not None:
                if entry in allow:
                    self.error(f"egress.allow[{i}]", "is listed twice")
                allow.append(entry)
        return EgressSettings(bool(restrict), tuple(allow), apt_proxy)

    def egress_allow(self, item: Any, p: str, app: AppSettings | None,
                     apt_proxy: str | None, tls: TlsSettings | None) -> EgressAllow | None:
        m = self.mapping(item, p, EGRESS_ALLOW_KEYS)
        if m is None:
            return None
        before = len(self.problems)
        to = self.field(m, p, "to", self._egress_network,
                        expect="a network in CIDR form like 203.0.113.0/24 (or one address)")
        port = self.field(m, p, "port", _int(1, 65535), expect="a port number 1..65535")
        proto = self.field(m, p, "proto", _choice(("tcp", "udp")), "tcp")
        tiers = self.field(m, p, "tiers", self._tier_list, TIERS)
        pin = self.field(m, p, "pin", _choice(EGRESS_PINS), None)
        if pin is not None and tiers is not None:
            configured = {"artifact_storage": app is not None and app.artifact_storage,
                          "operator_jwt": app is not None and app.operator_jwt,
                          "apt_proxy": apt_proxy,
                          "acme_directory": tls is not None and tls.mode == "acme"}[pin]
            if not configured:
                where = {"apt_proxy": "egress.apt_proxy",
                         "acme_directory": "tls.mode: acme"}.get(pin, f"app.{pin}")
                self.error(f"{p}.pin", f"pins {pin}, but {where} is not configured")
            elif pin == "acme_directory" and "proxy" not in tiers:
                self.error(f"{p}.tiers", f"pins {pin}, which the proxy tier reaches: "
                                         "list proxy in tiers")
            elif pin not in ("apt_proxy", "acme_directory") and "app" not in tiers:
                self.error(f"{p}.tiers", f"pins {pin}, which the app tier reaches: "
                                         "list app in tiers")
        if len(self.problems) != before:
            return None
        return EgressAllow(to, port, proto, tiers, pin)

    @classmethod
    def _egress_network(cls, v: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        expect = "a network in CIDR form like 203.0.113.0/24 or 2001:db8::/32 (or one address)"
        return cls._network(v, expect=expect, not_network=expect,
                            whole="is the whole internet, which defeats egress.restrict; "
                                  "name the networks")

    @staticmethod
    def _tier_list(v: Any) -> tuple[str, ...]:
        if not isinstance(v, list) or not v:
            raise _Bad(f"must be a non-empty list of tiers ({', '.join(TIERS)}); "
                       f"got {_kind(v)}")
        out = []
        for t in v:
            if t not in TIERS:
                raise _Bad(f"unknown tier {_show(t)}{did_you_mean(t, TIERS)}; tiers are "
                           f"{', '.join(TIERS)}")
            if t not in out:
                out.append(t)
        return tuple(t for t in TIERS if t in out)
    def app(self, top: dict[str, Any]) -> AppSettings | None:
        a = self.section(top, "", "app", APP_KEYS)
        if a is None:
            return None
        bind_given = "bind_port" in a
        bind = self.field(a, "app", "bind_port", _int(1024, 65535), 8080)
        bluegreen = self.bluegreen(a, bind, bind_given)
        if "bluegreen_ports" in a and not bind_given and bluegreen:
            bind = bluegreen[0]  # an explicit pair with no bind_port: blue is the first one
        service_user = self.field(a, "app", "service_user", _regex(USER_RE, _USER_EXPECT), "releasy")
        if service_user == "root":
            self.error("app.service_user", "Releasy must not run as root; use an unprivileged "
                                           "user such as releasy")
        return AppSettings(
            bind_port=bind,
            bluegreen_ports=bluegreen,
            service_user=service_user,
            log_level=self.field(a, "app", "log_level", _choice(LOG_LEVELS), "info"),
            public_base_url=self.field(a, "app", "public_base_url", _url, None),
            database_max_connections=self.field(a, "app", "database_max_connections",
                                                 _int(1, 1000), DEFAULT_DATABASE_MAX_CONNECTIONS),
            download_token_ttl_seconds=self.field(a, "app", "download_token_ttl_seconds",
                                                  _int(1, 4294967295), 600),
            releases_keep=self.field(a, "app", "releases_keep", _int(2, 100), 5),
            ready_timeout=self.field(a, "app", "ready_timeout", _int(1, 3600), 60),
            operator_jwt=self.operator_jwt(a),
            artifact_storage=self.artifact_storage(a),
        )

    def bluegreen(self, a: dict[str, Any], bind: int | None, bind_given: bool) -> tuple[int, int] | None:
        p = "app.bluegreen_ports"
        if "bluegreen_ports" not in a:
            if bind is None:
                return None
            if bind + 1 > 65535:
                self.error("app.bind_port", f"{bind} leaves no room for the second blue/green "
                                            "port; set app.bluegreen_ports explicitly")
                return None
            return (bind, bind + 1)
        raw = a["bluegreen_ports"]
        if not isinstance(raw, list) or len(raw) != 2:
            self.error(p, f"must be a list of two distinct ports, e.g. [8080, 8081]; got {_kind(raw)}"
                          + (f" with {len(raw)} items" if isinstance(raw, list) else ""))
            return None
        ports = []
        for i, v in enumerate(raw):
            try:
                ports.append(_int(1024, 65535)(v))
            except _Bad as e:
                self.error(f"{p}[{i}]", str(e))
        if len(ports) != 2:
            return None
        if ports[0] == ports[1]:
            self.error(f"{p}[1]", f"the two ports must differ; both are {ports[0]}")
            return None
        if bind_given and bind is not None and bind not in ports:
            self.error("app.bind_port", f"{bind} is not one of app.bluegreen_ports "
                                        f"{ports}; bind_port is the first instance's port")
        return (ports[0], ports[1])

    def operator_jwt(self, a: dict[str, Any]) -> OperatorJwt | None:
        if "operator_jwt" not in a or a["operator_jwt"] is None:
            return None
        p = "app.operator_jwt"
        j = self.section(a, "app", "operator_jwt", JWT_KEYS)
        if j is None:
            return None
        expect = "jwks_url, issuer and audience, which are required together"
        return OperatorJwt(
            jwks_url=self.field(j, p, "jwks_url", _url, expect=expect),
            issuer=self.field(j, p, "issuer", _text, expect=expect),
            audience=self.field(j, p, "audience", _text, expect=expect),
            resource=self.field(j, p, "resource", _text, None),
            jwks_ttl_seconds=self.field(j, p, "jwks_ttl_seconds", _int(1, 86400 * 7), 300),
            jwt_leeway_seconds=self.field(j, p, "jwt_leeway_seconds", _int(0, 3600), 0),
        )

    def artifact_storage(self, a: dict[str, Any]) -> ArtifactStorage | None:
        if "artifact_storage" not in a or a["artifact_storage"] is None:
            return None
        p = "app.artifact_storage"
        s = self.section(a, "app", "artifact_storage", STORAGE_KEYS)
        if s is None:
            return None
        expect = "bucket, region and endpoint, which are required together"
        return ArtifactStorage(
            bucket=self.field(s, p, "bucket", _regex(BUCKET_RE, "an S3 bucket name: 3-63 of "
                              "a-z 0-9 '.' '-', starting and ending with a letter or digit"),
                              expect=expect),
            region=self.field(s, p, "region", _regex(REGION_RE, "a region like eu-central-1"),
                              expect=expect),
            endpoint=self.field(s, p, "endpoint", _url, expect=expect),
            path_style=self.field(s, p, "path_style", _bool, False),
            presign_expires_seconds=self.field(s, p, "presign_expires_seconds",
                                               _int(1, 604800), 900),
        )

    def database(self, top: dict[str, Any]) -> DatabaseSettings | None:
        d = self.section(top, "", "database", DB_KEYS)
        if d is None:
            return None
        return DatabaseSettings(
            kind=self.field(d, "database", "kind", _choice(DB_KINDS), "postgres"),
            name=self.field(d, "database", "name", _regex(DB_IDENT_RE, _DB_EXPECT), "releasy"),
            user=self.field(d, "database", "user", _regex(DB_IDENT_RE, _DB_EXPECT), "releasy"),
            backups_keep=self.field(d, "database", "backups_keep", _int(1, 1000), 5),
            backup_before_deploy=self.field(d, "database", "backup_before_deploy", _bool, True),
            postgres_version=self.field(d, "database", "postgres_version", _pg_major, None),
        )

    def release(self, top: dict[str, Any]) -> ReleaseSource | None:
        r = self.section(top, "", "release", RELEASE_KEYS, required=True)
        if r is None:
            return None
        arch = self.field(r, "release", "arch",
                          _choice(ARCHES, {"amd64": "x86_64", "aarch64": "arm64", "x64": "x86_64"}),
                          "x86_64")
        source = self.field(r, "release", "source", _source_text, expect=(
            "an http(s) URL template containing {version} (optionally {arch}), or a local "
            "directory holding releasy-server-{version}-linux-{arch}.tar.gz files"))
        is_url = isinstance(source, str) and "://" in source
        directory = None
        if isinstance(source, str):
            if is_url:
                self.release_url(source)
            else:
                directory = self.release_dir(source)
        sha256 = self.release_sha256(r)
        sha256_file = self.field(r, "release", "sha256_file", self.path_value, None)
        if sha256_file is not None:
            self.existing_file("release.sha256_file", sha256_file)
            if self.check_files and sha256_file.is_file():
                try:
                    _, bad = _parse_sums(_read_text(sha256_file))
                except InventoryError as e:
                    self.problems.extend(e.problems)
                else:
                    self.problems.extend(Problem(str(sha256_file), w, m) for w, m in bad)
        if is_url and not r.get("sha256") and "sha256_file" not in r:
            self.error("release.sha256", (
                "a URL source needs pinned checksums: add release.sha256 (version: sha256) "
                "or release.sha256_file; downloads are never trusted unverified"))
        return ReleaseSource(source=source, is_url=is_url, directory=directory, arch=arch,
                             sha256=MappingProxyType(dict(sha256)), sha256_file=sha256_file)

    def release_url(self, source: str) -> None:
        p = "release.source"
        placeholders = set(re.findall(r"\{[^{}]*\}", source))
        unknown = placeholders - {"{version}", "{arch}"}
        if unknown:
            self.error(p, f"unknown placeholder(s) {', '.join(sorted(unknown))}; only {{version}} "
                          "and {arch} are substituted")
            return
        if "{version}" not in placeholders:
            self.error(p, "the URL must contain {version}, e.g. "
                          ".../download/v{version}/releasy-server-linux-{arch}.tar.gz")
            return
        try:
            _url(source.replace("{version}", "1.0.0").replace("{arch}", "x86_64"))
        except _Bad as e:
            self.error(p, str(e).replace("'1.0.0'", "{version}"))

    def release_dir(self, source: str) -> Path | None:
        p = "release.source"
        if "{" in source or "}" in source:
            self.error(p, "a local directory source takes no placeholders: it names the "
                          "directory holding releasy-server-{version}-linux-{arch}.tar.gz files")
            return None
        try:
            directory = self.path_value(source)
        except _Bad as e:
            self.error(p, str(e))
            return None
        if self.check_files and not directory.is_dir():
            self.error(p, f"not a URL (http:// or https://) and not an existing directory: {directory}")
        return directory

    def release_sha256(self, r: dict[str, Any]) -> dict[str, str]:
        if "sha256" not in r or r["sha256"] is None:
            return {}
        m = self.mapping(r["sha256"], "release.sha256", None)
        out: dict[str, str] = {}
        for version, digest in (m or {}).items():
            p = _join("release.sha256", version)
            if not VERSION_RE.fullmatch(version):
                self.error(p, f"invalid version {_show(version)}; expected X.Y.Z with an optional "
                              "-prerelease/+build suffix, quoted (e.g. \"1.2.3\")")
                continue
            if not isinstance(digest, str):
                self.error(p, f"must be a sha256 digest (64 lowercase hex digits); got {_kind(digest)}")
            elif not SHA256_RE.fullmatch(digest):
                note = " (use lowercase)" if SHA256_RE.fullmatch(digest.lower()) else ""
                self.error(p, f"must be a sha256 digest: 64 lowercase hex digits{note}; got "
                              f"{len(digest)} characters")
            else:
                out[version] = digest
        return out

    def tls(self, top: dict[str, Any]) -> TlsSettings | None:
        t = self.section(top, "", "tls", TLS_KEYS, required=True)
        if t is None:
            return None
        mode = self.field(t, "tls", "mode", _choice(TLS_MODES),
                          expect="self-signed, files or acme")
        server_name = self.field(t, "tls", "server_name", _dns_name,
                                 expect="the public DNS name clients use, e.g. releasy.example.com")
        cert = key = None
        if mode == "files":
            cert = self.field(t, "tls", "certificate", self.path_value,
                              expect="the PEM certificate (chain) file, required with mode: files")
            key = self.field(t, "tls", "key", self.path_value,
                             expect="the PEM private key file, required with mode: files")
            self.existing_file("tls.certificate", cert)
            self.existing_file("tls.key", key)
            if self.check_files and key is not None and key.is_file():
                mode_bits = stat.S_IMODE(key.stat().st_mode)
                if mode_bits & 0o077:
                    self.error("tls.key", f"{key} is accessible by group/others (mode "
                                          f"{mode_bits:04o}); run `chmod 600 {key}`")
        elif mode in ("self-signed", "acme"):
            for k in ("certificate", "key"):
                if k in t:
                    self.error(f"tls.{k}", f"only used with mode: files (mode is {mode})")
        acme = None
        if mode == "acme":
            acme = self.acme(t)
        elif t is not None and "acme" in t:
            self.error("tls.acme", f"only used with mode: acme (mode is {mode})")
        return TlsSettings(mode=mode, server_name=server_name, certificate=cert, key=key,
                           acme=acme)

    def acme(self, t: dict[str, Any]) -> AcmeSettings | None:
        a = self.section(t, "tls", "acme", ACME_KEYS, required=True)
        if a is None:
            return None
        email = self.field(a, "tls.acme", "email", _regex(EMAIL_RE, "an e-mail address"),
                           expect="the e-mail address the CA sends expiry notices to")
        staging = self.field(a, "tls.acme", "staging", _bool, False)
        url = self.field(a, "tls.acme", "directory_url", _url, None)
        if url is not None and not url.startswith("https://"):
            self.error("tls.acme.directory_url", "must be an https:// URL (ACME needs TLS)")
        if url is not None and staging:
            self.error("tls.acme.staging", "staging selects Let's Encrypt's staging "
                                           "directory: leave it out with directory_url")
        ca_bundle = self.field(a, "tls.acme", "ca_bundle", self.path_value, None)
        self.existing_file("tls.acme.ca_bundle", ca_bundle)
        if email is None:
            return None
        return AcmeSettings(email=email, directory_url=url or (
            LETSENCRYPT_STAGING if staging else LETSENCRYPT), ca_bundle=ca_bundle)
