"""Secrets: a 0600 file beside the inventory and/or RELEASY_* environment variables."""
from __future__ import annotations

from pathlib import Path

import pytest

from releasy_deploy.inventory import InventoryError, load_inventory
from releasy_deploy.secrets import SECRET_ENV_VARS, Secrets, load_secrets

INVENTORY = """
environment: staging
admin_cidrs: [203.0.113.0/24]
known_hosts: known_hosts
hosts:
  solo: {address: 192.0.2.5}
tiers: {proxy: [solo], app: [solo], db: [solo]}
release: {source: releases}
tls: {mode: self-signed, server_name: releasy.test}
"""

STORAGE = """
app:
  artifact_storage: {bucket: releasy-artifacts, region: eu-central-1,
                     endpoint: "https://s3.example.com"}
"""

ADMIN = "adm1n-S3cret-value"
PEPPER = "pepper-S3cret-value"


def make_inventory(tmp_path: Path, extra: str = ""):
    (tmp_path / "known_hosts").write_text("")
    (tmp_path / "releases").mkdir(exist_ok=True)
    (tmp_path / "hosts.yaml").write_text(INVENTORY + extra)
    return load_inventory(tmp_path / "hosts.yaml")


def write_secrets(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    p = tmp_path / "secrets.yaml"
    p.write_text(text)
    p.chmod(mode)
    return p


@pytest.fixture
def inv(tmp_path):
    return make_inventory(tmp_path)


def refused(inv, environ=None) -> InventoryError:
    with pytest.raises(InventoryError) as exc:
        load_secrets(inv, environ or {})
    return exc.value


def test_no_file_no_environment_is_fine(inv):
    s = load_secrets(inv, {})
    assert s.names == () and s.get("admin_api_key") is None
    assert inv.secrets_file == inv.path.parent / "secrets.yaml"


def test_file_is_read(inv, tmp_path):
    write_secrets(tmp_path, f"admin_api_key: {ADMIN}\napi_key_pepper: '{PEPPER}'\n")
    s = load_secrets(inv, {})
    assert s.get("admin_api_key") == ADMIN and s.get("api_key_pepper") == PEPPER
    assert "admin_api_key" in s and s.names == ("admin_api_key", "api_key_pepper")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o620])
def test_group_or_world_accessible_file_is_refused(inv, tmp_path, mode):
    p = write_secrets(tmp_path, f"admin_api_key: {ADMIN}\n", mode)
    err = refused(inv)
    assert str(p) in str(err)
    assert f"chmod 600 {p}" in str(err)
    assert f"{mode:04o}" in str(err)
    assert ADMIN not in str(err)


def test_read_only_owner_file_is_accepted(inv, tmp_path):
    write_secrets(tmp_path, f"admin_api_key: {ADMIN}\n", 0o400)
    assert load_secrets(inv, {}).get("admin_api_key") == ADMIN


def test_environment_overrides_file(inv, tmp_path):
    write_secrets(tmp_path, f"admin_api_key: from-file-value-0123\napi_key_pepper: {PEPPER}\n")
    s = load_secrets(inv, {"RELEASY_ADMIN_API_KEY": ADMIN, "RELEASY_API_KEY_PEPPER": ""})
    assert s.get("admin_api_key") == ADMIN
    assert s.get("api_key_pepper") == PEPPER  # empty variable counts as unset


def test_environment_alone(inv):
    environ = {var: f"value-for-{name}" for name, var in SECRET_ENV_VARS.items()}
    s = load_secrets(inv, environ)
    assert s.names == tuple(SECRET_ENV_VARS)


def test_default_environ_is_os_environ(inv, monkeypatch):
    monkeypatch.setenv("RELEASY_ADMIN_API_KEY", ADMIN)
    assert load_secrets(inv).get("admin_api_key") == ADMIN


def test_unknown_key_is_refused_without_echoing_values(inv, tmp_path):
    p = write_secrets(tmp_path, f"admin_api_kye: {ADMIN}\ndatabase_password: {PEPPER}\n")
    err = refused(inv)
    text = str(err)
    assert f"{p}: admin_api_kye: unknown secret (did you mean 'admin_api_key'?)" in text
    assert f"{p}: database_password: unknown secret" in text
    assert ADMIN not in text and PEPPER not in text


def test_key_that_looks_like_a_value_is_not_echoed(inv, tmp_path):
    write_secrets(tmp_path, f"{ADMIN}: x\n")
    text = str(refused(inv))
    assert ADMIN not in text and "(key not shown)" in text


@pytest.mark.parametrize("value,fragment", [
    ("12345678", "must be a string"),
    ("true", "must be a string"),
    ("''", "is empty"),
    ("' padded '", "whitespace"),
    ('"a\\nb"', "control characters"),
    ("short-secret", "shorter than 16 characters"),
    ("", "must be a string"),  # null
])
def test_bad_values_are_refused_without_echoing(inv, tmp_path, value, fragment):
    write_secrets(tmp_path, f"admin_api_key: {value}\n")
    err = refused(inv)
    (problem,) = err.problems
    assert problem.path == "admin_api_key" and fragment in problem.message
    if value.strip("'\"") and value not in ("true",):
        assert value.strip("'\" ") not in problem.message


def test_bad_environment_value(inv):
    err = refused(inv, {"RELEASY_API_KEY_PEPPER": "line1\nline2"})
    assert "environment: RELEASY_API_KEY_PEPPER: contains control characters" in str(err)
    assert "line1" not in str(err)


def test_syntax_error_does_not_quote_the_file(inv, tmp_path):
    write_secrets(tmp_path, f"admin_api_key: {ADMIN}\napi_key_pepper: [{PEPPER}\n")
    err = refused(inv)
    assert "line" in err.problems[0].path
    assert ADMIN not in str(err) and PEPPER not in str(err)


def test_duplicate_key_is_refused(inv, tmp_path):
    write_secrets(tmp_path, f"admin_api_key: {ADMIN}\nadmin_api_key: {PEPPER}\n")
    err = refused(inv)
    assert "duplicate key" in str(err)
    assert ADMIN not in str(err) and PEPPER not in str(err)


def test_top_level_must_be_a_mapping(inv, tmp_path):
    write_secrets(tmp_path, f"- {ADMIN}\n")
    err = refused(inv)
    assert "mapping" in str(err) and ADMIN not in str(err)


def test_artifact_storage_requires_its_keys(tmp_path):
    inv = make_inventory(tmp_path, STORAGE)
    err = refused(inv)
    paths = {p.path for p in err.problems}
    assert paths == {"artifact_access_key", "artifact_secret_key"}
    assert "RELEASY_ARTIFACT_ACCESS_KEY" in str(err)
    s = load_secrets(inv, {"RELEASY_ARTIFACT_ACCESS_KEY": "ak-0123456789abcdef", "RELEASY_ARTIFACT_SECRET_KEY": "sk-0123456789abcdef"})
    assert s.get("artifact_secret_key") == "sk-0123456789abcdef"


def test_custom_secrets_file_location(tmp_path):
    inv = make_inventory(tmp_path, "secrets: {file: private/releasy-secrets.yaml}\n")
    (tmp_path / "private").mkdir()
    p = tmp_path / "private" / "releasy-secrets.yaml"
    p.write_text(f"admin_api_key: {ADMIN}\n")
    p.chmod(0o600)
    assert inv.secrets_file == p
    assert load_secrets(inv, {}).get("admin_api_key") == ADMIN


def test_repr_shows_names_only(inv, tmp_path):
    write_secrets(tmp_path, f"admin_api_key: {ADMIN}\n")
    s = load_secrets(inv, {"RELEASY_API_KEY_PEPPER": PEPPER})
    for text in (repr(s), str(s), f"{s}", repr([s]), repr({"s": s})):
        assert ADMIN not in text and PEPPER not in text
        assert "admin_api_key" in text and "api_key_pepper" in text


def test_get_unknown_name_is_a_programming_error():
    with pytest.raises(KeyError):
        Secrets().get("database_password")


def test_require(inv):
    s = load_secrets(inv, {"RELEASY_ADMIN_API_KEY": ADMIN})
    s.require("admin_api_key")
    with pytest.raises(InventoryError) as exc:
        s.require("admin_api_key", "api_key_pepper")
    (problem,) = exc.value.problems
    assert problem.path == "api_key_pepper" and "RELEASY_API_KEY_PEPPER" in problem.message


def test_secrets_are_immutable(inv):
    s = load_secrets(inv, {"RELEASY_ADMIN_API_KEY": ADMIN})
    with pytest.raises(TypeError):
        s.values["admin_api_key"] = "x"
