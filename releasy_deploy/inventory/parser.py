"""The inventory parser: the whole document read section by section (each section's
parser is a mixin), every problem collected, then the `Inventory` built."""
from __future__ import annotations

from typing import Any

from ..hook_schema import parse_hooks
from .fields import _ENV_EXPECT, SECRETS_KEYS, TOP_KEYS
from .model import ENVIRONMENT_RE, Inventory
from .problems import ROOT, InventoryError
from .settings import _SettingsParser
from .topology import _TopologyParser
from .values import _regex


class _Parser(_TopologyParser, _SettingsParser):
    # -- the document

    def run(self, data: Any) -> Inventory:
        inv = self.document(data)
        if self.problems or inv is None:
            raise InventoryError(self.problems)
        return inv

    def document(self, data: Any) -> Inventory | None:
        if data is None:
            self.error(ROOT, "the inventory is empty; see the example hosts.yaml for the schema")
            return None
        top = self.mapping(data, "", TOP_KEYS)
        if top is None:
            return None
        environment = self.field(top, "", "environment", _regex(ENVIRONMENT_RE, _ENV_EXPECT),
                                 expect=_ENV_EXPECT)
        admin_cidrs = self.admin_cidrs(top)
        ssh, ssh_user, ssh_port = self.ssh(top)
        jump_specs = self.jump_hosts(top, ssh_user, ssh_port, ssh)
        hosts = self.hosts(top, ssh_user, ssh_port)
        tiers = self.tiers(top, hosts)
        app = self.app(top)
        database = self.database(top)
        release = self.release(top)
        tls = self.tls(top)
        sec = self.section(top, "", "secrets", SECRETS_KEYS)
        secrets_file = self.field(sec, "secrets", "file", self.path_value,
                                  self.base / "secrets.yaml")
        egress = self.egress(top, app, tls)
        hooks = parse_hooks(top.get("hooks"), self.error)

        host_objs = self.build_hosts(hosts or {}, tiers)
        host_objs = self.resolve_jumps(top, host_objs, hosts or {}, jump_specs, ssh)
        jumps_used = tuple(dict.fromkeys(h.jump for h in host_objs if h.jump is not None))
        known_hosts = self.field(top, "", "known_hosts", self.path_value,
                                 expect="a file path (relative to the inventory's directory)")
        self.existing_file("known_hosts", known_hosts, self.keyscan_hint(known_hosts, host_objs))
        if hosts is not None:
            self.cross_checks(host_objs, tiers, app, database)

        if self.problems:
            return None
        return Inventory(
            path=self.path.absolute(), environment=environment, admin_cidrs=admin_cidrs,
            known_hosts=known_hosts, ssh=ssh, hosts=host_objs, app=app, database=database,
            release=release, tls=tls, secrets_file=secrets_file, jump_hosts=jumps_used,
            egress=egress, hooks=hooks, base_path=self.base_path and self.base_path.absolute())
