"""Parsing the inventory's machines: ``admin_cidrs``, ``ssh``, ``jump_hosts``, ``hosts`` and
``tiers``, then the checks across them (addresses, one db host, sqlite's single host)."""
from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

from .fields import _HOST_EXPECT, _USER_EXPECT, HOST_KEYS, JUMP_KEYS, SSH_KEYS, _Fields
from .model import (HOST_NAME_RE, POSTGRES_PORT, TIERS, USER_RE, AppSettings, DatabaseSettings,
                    Host, JumpHost, SshSettings)
from .values import (_address, _Bad, _int, _ip, _is_ip, _join, _jump_ref, _kind, _meta_note,
                     _regex, _seconds, _show, did_you_mean)


class _TopologyParser(_Fields):
    def admin_cidrs(self, top: dict[str, Any]) -> tuple[Any, ...]:
        expect = "a non-empty list of networks SSH is allowed from, e.g. [203.0.113.0/24]"
        if "admin_cidrs" not in top:
            self.error("admin_cidrs", f"required key is missing; expected {expect}")
            return ()
        raw = top["admin_cidrs"]
        if not isinstance(raw, list) or not raw:
            self.error("admin_cidrs", f"must be {expect}; got {_kind(raw)}")
            return ()
        nets: list[Any] = []
        for i, v in enumerate(raw):
            p = f"admin_cidrs[{i}]"
            try:
                net = self._network(
                    v, expect="a network in CIDR form like 203.0.113.0/24",
                    not_network="a network in CIDR form like 203.0.113.0/24 or 2001:db8::/32",
                    whole="would allow SSH from the whole internet; list the operators'"
                          " networks instead")
            except _Bad as exc:
                self.error(p, str(exc))
                continue
            if net in nets:
                self.error(p, f"{v} is listed twice")
            else:
                nets.append(net)
        return tuple(nets)

    def jump_hosts(self, top: dict[str, Any], user: str | None, port: int | None,
                   ssh: SshSettings) -> dict[str, JumpHost]:
        """``jump_hosts:``: bastions that are not inventory hosts (name -> JumpHost)."""
        if top.get("jump_hosts") is None:
            return {}
        raw = self.mapping(top["jump_hosts"], "jump_hosts", None) or {}
        out: dict[str, JumpHost] = {}
        for name, spec in raw.items():
            p = _join("jump_hosts", name)
            if not HOST_NAME_RE.fullmatch(name):
                self.error(p, f"invalid jump host name {_show(name)}{_meta_note(name)}; "
                              f"must be {_HOST_EXPECT}")
                continue
            m = self.mapping(spec if spec is not None else {}, p, JUMP_KEYS)
            if m is None:
                continue
            address = self.field(m, p, "address", _address,
                                 expect="the IP address or DNS name SSH connects to")
            private = self.field(m, p, "private_address", lambda v: str(_ip(v)), None)
            if private is None and address is not None and "private_address" not in m:
                if _is_ip(address):
                    private = address
                else:
                    self.error(f"{p}.private_address", (
                        f"required when address is a DNS name ({address}): the hosts behind "
                        "it allow SSH from this address only, so it must be an IP literal"))
            identity = self.field(m, p, "identity_file", self.path_value, ssh.identity_file)
            if "identity_file" in m:
                self.existing_file(f"{p}.identity_file", identity)
            if address is None:
                continue
            out[name] = JumpHost(
                name=name, address=address, private_address=private,
                ssh_user=self.field(m, p, "user", _regex(USER_RE, _USER_EXPECT), user),
                ssh_port=self.field(m, p, "port", _int(1, 65535), port),
                identity_file=identity)
        return out

    def resolve_jumps(self, top: dict[str, Any], hosts: tuple[Host, ...],
                      raw: dict[str, dict[str, Any]], specs: dict[str, JumpHost],
                      ssh: SshSettings | None) -> tuple[Host, ...]:
        """Give every host its jump host: its own ``jump:``, else ``ssh.jump``. A jump host
        that is an inventory host is reached directly itself (no chains)."""
        s = top.get("ssh") if isinstance(top.get("ssh"), dict) else {}
        default = None
        if "jump" in s:
            try:
                default = _jump_ref(s["jump"])
            except _Bad:
                default = None  # reported by ssh()
        by_name = {h.name: h for h in hosts}
        for name in specs:
            if name in by_name:
                self.error(_join("jump_hosts", name), (
                    f"{name!r} is also an inventory host; an inventory host can be a jump "
                    "host as it is (ssh.jump / jump: NAME), remove it from jump_hosts"))

        def lookup(ref: str, ypath: str) -> JumpHost | None:
            if ref in specs:
                return specs[ref]
            if ref in by_name:
                h = by_name[ref]
                private = h.private_address
                if private is None or not _is_ip(private):
                    self.error(ypath, f"jump host {ref!r} needs an IP literal private_address: "
                                      "the hosts behind it allow SSH from that address only")
                    return None
                return JumpHost(name=h.name, address=h.address, private_address=private,
                                ssh_user=h.ssh_user, ssh_port=h.ssh_port,
                                identity_file=ssh.identity_file if ssh else None, managed=True)
            known = sorted({*specs, *by_name})
            self.error(ypath, f"unknown jump host {_show(ref)}{did_you_mean(ref, known)}; "
                              "name an inventory host or an entry of jump_hosts")
            return None

        default_jump = lookup(default, "ssh.jump") if default else None
        used_as_jump = set()
        result = []
        for h in hosts:
            own = raw.get(h.name, {}).get("jump")
            given = own is not None
            if given:
                jump = None if own is False else lookup(own, f"hosts.{h.name}.jump")
            else:
                jump = default_jump
            if jump is not None and jump.name == h.name:
                if given:
                    self.error(f"hosts.{h.name}.jump", "a host cannot be its own jump host")
                jump = None  # the jump host itself: direct
            if jump is not None:
                used_as_jump.add(jump.name)
            result.append(Host(name=h.name, address=h.address, private_address=h.private_address,
                               ssh_user=h.ssh_user, ssh_port=h.ssh_port, tiers=h.tiers,
                               jump=jump))
        for h in result:
            if h.name in used_as_jump and h.jump is not None:
                self.error(f"hosts.{h.name}.jump", (
                    f"{h.name} is a jump host for other hosts, so it must be reached directly "
                    "(chained jump hosts are not supported): set `jump: false` here"))
        return tuple(result)

    def ssh(self, top: dict[str, Any]) -> tuple[SshSettings, str | None, int | None]:
        s = self.section(top, "", "ssh", SSH_KEYS)
        user = self.field(s, "ssh", "user", _regex(USER_RE, _USER_EXPECT), "root")
        port = self.field(s, "ssh", "port", _int(1, 65535), 22)
        identity = self.field(s, "ssh", "identity_file", self.path_value, None)
        self.existing_file("ssh.identity_file", identity)
        timeout = self.field(s, "ssh", "connect_timeout", _seconds(600), 10.0)
        self.field(s, "ssh", "jump", _jump_ref, None)  # resolved in resolve_jumps
        return SshSettings(identity_file=identity, connect_timeout=timeout), user, port

    def hosts(self, top: dict[str, Any], user: str | None,
              port: int | None) -> dict[str, dict[str, Any]] | None:
        """name -> validated fields (None where invalid), in file order; None when the
        section is missing or not a mapping (then tier references cannot be checked)."""
        if "hosts" not in top:
            self.error("hosts", "required key is missing; expected a mapping of host name -> "
                                "{address: ...}")
            return None
        raw = self.mapping(top["hosts"], "hosts", None)
        if raw is None:
            return None
        if not raw:
            self.error("hosts", "must define at least one host")
        out: dict[str, dict[str, Any]] = {}
        for name, spec in raw.items():
            p = _join("hosts", name)
            if not HOST_NAME_RE.fullmatch(name):
                self.error(p, f"invalid host name {_show(name)}{_meta_note(name)}; "
                              f"must be {_HOST_EXPECT}")
            if spec is None:
                self.error(p, "host has no settings; at least `address:` is required")
                out[name] = {"address": None}
                continue
            m = self.mapping(spec, p, HOST_KEYS)
            address = self.field(m, p, "address", _address,
                                 expect="the IP address or DNS name SSH connects to")
            private_given = m is not None and "private_address" in m
            private = self.field(m, p, "private_address", lambda v: str(_ip(v)), None)
            out[name] = {
                "address": address,
                "private_address": private,
                "private_given": private_given,
                "ssh_user": self.field(m, p, "ssh_user", _regex(USER_RE, _USER_EXPECT), user),
                "ssh_port": self.field(m, p, "ssh_port", _int(1, 65535), port),
                "jump": self.field(m, p, "jump", _jump_ref, None),
            }
        return out

    def tiers(self, top: dict[str, Any],
              hosts: dict[str, dict[str, Any]] | None) -> dict[str, list[str]] | None:
        """tier -> listed host names; None when the section is missing or not a mapping."""
        expect = "a mapping of tier -> list of host names, tiers: proxy, app, db"
        if "tiers" not in top:
            self.error("tiers", f"required key is missing; expected {expect}")
            return None
        m = self.mapping(top["tiers"], "tiers", TIERS)
        if m is None:
            return None
        out: dict[str, list[str]] = {}
        for tier in TIERS:
            p = f"tiers.{tier}"
            if tier not in m or m[tier] is None:
                continue  # reported by cross_checks, which knows what is missing and why
            names = m[tier]
            if not isinstance(names, list):
                hint = f" (write [{names}])" if isinstance(names, str) else ""
                self.error(p, f"must be a list of host names{hint}; got {_kind(names)}")
                self.bad_tiers.add(tier)
                continue
            listed: list[str] = []
            for i, name in enumerate(names):
                ip = f"{p}[{i}]"
                if not isinstance(name, str):
                    self.error(ip, f"must be a host name; got {_kind(name)}")
                elif hosts is None:
                    listed.append(name)  # no hosts section: already reported
                elif name not in hosts:
                    defined = ", ".join(hosts) or "none"
                    self.error(ip, f"host {_show(name)} is not defined under hosts"
                                   f"{did_you_mean(name, hosts)}; defined hosts: {defined}")
                elif name in listed:
                    self.error(ip, f"host {name!r} is listed twice in this tier")
                else:
                    listed.append(name)
            out[tier] = listed
        return out

    def build_hosts(self, hosts: dict[str, dict[str, Any]],
                    tiers: dict[str, list[str]] | None) -> tuple[Host, ...]:
        result = []
        for name, h in hosts.items():
            host_tiers = tuple(t for t in TIERS if name in (tiers or {}).get(t, ()))
            if not host_tiers and tiers is not None and not self.bad_tiers:
                self.error(_join("hosts", name), "host is not in any tier; add it under tiers "
                                                 "(proxy, app, db) or remove it")
            private = h.get("private_address") or h.get("address")
            result.append(Host(name=name, address=h.get("address"), private_address=private,
                               ssh_user=h.get("ssh_user"), ssh_port=h.get("ssh_port"),
                               tiers=host_tiers))
        self.address_checks(hosts, result)
        return tuple(result)

    def address_checks(self, raw: dict[str, dict[str, Any]], hosts: list[Host]) -> None:
        multi = len(hosts) > 1
        seen_ssh: dict[tuple[str, int], str] = {}
        seen_private: dict[str, str] = {}
        for h in hosts:
            p = _join("hosts", h.name)
            if h.address is None:
                continue
            # Same address on another SSH port is allowed (port-forwarded labs); the
            # private addresses below must still differ.
            endpoint = (h.address, h.ssh_port)
            dup_endpoint = endpoint in seen_ssh
            if dup_endpoint:
                self.error(f"{p}.address", (
                    f"{h.address} (port {h.ssh_port}) is also the address of host "
                    f"{seen_ssh[endpoint]!r}; one machine carrying several tiers is one host "
                    "entry listed in several tiers"))
            seen_ssh.setdefault(endpoint, h.name)
            given = raw[h.name].get("private_given", False)
            if multi and not given and not _is_ip(h.address):
                self.error(f"{p}.private_address", (
                    f"required when address is a DNS name ({h.address}) and there are several "
                    "hosts: tier-to-tier rules (firewall, pg_hba, upstreams) need an IP literal"))
                continue
            if h.private_address is None or not _is_ip(h.private_address):
                continue
            where = f"{p}.private_address" if given else f"{p}.address"
            if multi and ipaddress.ip_address(h.private_address).is_loopback:
                self.error(where, (
                    f"{h.private_address} is a loopback address, which other hosts cannot "
                    "reach; set private_address to an address the other hosts can reach"))
            elif h.private_address in seen_private and not (dup_endpoint and not given):
                self.error(where, (
                    f"private address {h.private_address} is also used by host "
                    f"{seen_private[h.private_address]!r}; each host needs its own"
                    + ("" if given else " (set private_address)")))
            seen_private.setdefault(h.private_address, h.name)

    def cross_checks(self, hosts: tuple[Host, ...], tiers: dict[str, list[str]] | None,
                     app: AppSettings | None, database: DatabaseSettings | None) -> None:
        if tiers is None:
            return  # the missing/invalid section was already reported
        proxies = [h for h in hosts if "proxy" in h.tiers]
        apps = [h for h in hosts if "app" in h.tiers]
        dbs = [h for h in hosts if "db" in h.tiers]
        if not proxies and "proxy" not in self.bad_tiers:
            self.error("tiers.proxy", "no proxy host: list at least one host (the proxy "
                                      "terminates TLS and is the only public entry point)")
        if not apps and "app" not in self.bad_tiers:
            self.error("tiers.app", "no app host: list at least one host to run Releasy")
        if not dbs and "db" not in self.bad_tiers:
            self.error("tiers.db", "no database host: list exactly one host (for sqlite, the app host)")
        elif len(dbs) > 1:
            self.error("tiers.db", f"only one database host is supported; got "
                                      f"{', '.join(h.name for h in dbs)}")
        if database is None or database.kind is None:
            return
        if database.kind == "sqlite" and apps and dbs:
            if len(apps) > 1:
                self.error("database.kind", (
                    f"sqlite needs a single app host, but tiers.app lists {len(apps)} "
                    f"({', '.join(h.name for h in apps)}); use kind: postgres"))
            elif apps[0].name != dbs[0].name:
                self.error("database.kind", (
                    f"sqlite needs the app and db tiers on the same host, but app is "
                    f"{apps[0].name!r} and db is {dbs[0].name!r}; use kind: postgres or "
                    "list one host in both tiers"))
        if (database.kind == "postgres" and app is not None and app.bluegreen_ports
                and None not in app.bluegreen_ports and POSTGRES_PORT in app.bluegreen_ports
                and any("db" in h.tiers for h in apps)):
            self.error("app.bluegreen_ports", f"port {POSTGRES_PORT} is PostgreSQL's, which "
                                              "runs on the same host as the app")

    def keyscan_hint(self, known_hosts: Path | None, hosts: tuple[Host, ...]) -> str:
        by_port: dict[int, list[str]] = {}
        for h in hosts:
            if h.address is not None and h.ssh_port is not None:
                by_port.setdefault(h.ssh_port, []).append(h.address)
        if not by_port or known_hosts is None:
            return ("; create it with `ssh-keyscan -t ed25519 HOST... > known_hosts` and "
                    "verify the fingerprints (ssh-keygen -lf known_hosts) out of band")
        cmds = " && ".join(
            f"ssh-keyscan -t ed25519 -p {port} {' '.join(addrs)} >> {known_hosts}"
            for port, addrs in by_port.items())
        return (f"; create it with `{cmds}`, then check every fingerprint "
                f"(`ssh-keygen -lf {known_hosts}`) against the hosts' consoles before trusting it")
