"""The inventory: ``hosts.yaml`` parsed once into frozen dataclasses.

Everything an operator can get wrong is checked here, before any SSH connection is made.
Problems are collected rather than raised one at a time, so a single run lists every
mistake as ``FILE: YAML.PATH: message`` lines. Any string that later ends up in a shell
command, a config file or a path on a remote host must pass a strict regex here; free-text
values (URLs, JWT issuer/audience) are checked against a set of characters that can never
be legitimate in them.

The commented example ``hosts.yaml`` at the repository root documents every key.

This package's public names are all importable from here; its parts, one job each:
`problems` (how a problem is reported), `model` (the dataclasses and their vocabulary),
`sums` (checksum files), `values` (checks of single values), `loading` (which file, YAML
reading, the RELEASY_ENV merge), `fields` (the parser's plumbing and each section's keys),
`topology` and `settings` (the sections' parsers), `parser` (the whole document).
"""
from __future__ import annotations

from ..hook_schema import Hooks
from .fields import (ACME_KEYS, APP_KEYS, DB_KEYS, EGRESS_ALLOW_KEYS, EGRESS_KEYS, HOST_KEYS,
                     JUMP_KEYS, JWT_KEYS, RELEASE_KEYS, SECRETS_KEYS, SSH_KEYS, STORAGE_KEYS,
                     TLS_KEYS, TOP_KEYS)
from .loading import UNREADABLE, inventory_path, load_inventory, load_yaml_file, parse_inventory
from .model import (ARCHES, BUCKET_RE, DB_IDENT_RE, DB_KINDS, DEFAULT_INVENTORY, DNS_NAME_RE,
                    EGRESS_PINS, EMAIL_RE, ENV_VAR, ENVIRONMENT_RE, HOST_NAME_RE, LETSENCRYPT,
                    LETSENCRYPT_STAGING, LOG_LEVELS, POSTGRES_PORT, REGION_RE, SHA256_RE,
                    TIERS, TLS_MODES, USER_RE, VERSION_RE, AcmeSettings, AppSettings,
                    ArtifactStorage, DatabaseSettings, EgressAllow, EgressSettings, Host,
                    Inventory, JumpHost, OperatorJwt, ReleaseSource, SshSettings, TlsSettings,
                    check_version)
from .problems import FILE, ROOT, InventoryError, Problem
from .values import Check, did_you_mean

__all__ = [
    "TIERS", "ENV_VAR", "DEFAULT_INVENTORY", "InventoryError", "Problem", "Host",
    "SshSettings", "JumpHost", "OperatorJwt", "ArtifactStorage", "AppSettings", "DatabaseSettings",
    "ReleaseSource", "AcmeSettings", "TlsSettings", "Inventory", "inventory_path", "load_inventory",
    "parse_inventory", "load_yaml_file", "UNREADABLE", "check_version", "did_you_mean",
    "VERSION_RE", "EgressAllow", "EgressSettings", "EGRESS_PINS", "Hooks",
]
