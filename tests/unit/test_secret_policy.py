"""Secrets that must never drift: what the app hosts get, given the operator's side and
what the hosts keep (pure logic), and the kept file's probe/parse round trip."""
from __future__ import annotations

import subprocess

import pytest

from releasy_deploy.commands import kept_secrets as kept
from releasy_deploy.commands.systemd import quote_env_value
from releasy_deploy.secret_policy import SecretDrift, resolve

PEPPER = "pepper-aaaaaaaaaaaaaaaa"
OTHER = "pepper-bbbbbbbbbbbbbbbb"
ADMIN = "admin-cccccccccccccccc"


def host(kept_values=None, env=None, problem=None):
    return kept.KeptState(kept_values, env or {}, problem, tidy=True)


def fixed():
    return "generated-zzzzzzzzzzzzzzzz"


def test_first_install_generates_the_pepper_only():
    res = resolve({}, {"app1": host(), "app2": host()}, make=fixed)
    assert res.values == {"api_key_pepper": fixed()}
    assert res.generated == ("api_key_pepper",)


def test_operator_value_on_fresh_hosts_is_used():
    res = resolve({"api_key_pepper": PEPPER, "admin_api_key": ADMIN}, {"app1": host()})
    assert res.values == {"api_key_pepper": PEPPER, "admin_api_key": ADMIN}
    assert res.generated == () and res.rotated == ()


def test_missing_on_operator_side_keeps_the_hosts_value():
    hosts = {"app1": host({"api_key_pepper": PEPPER, "admin_api_key": ADMIN}),
             "app2": host({"api_key_pepper": PEPPER, "admin_api_key": ADMIN})}
    res = resolve({}, hosts, make=fixed)
    assert res.values == {"api_key_pepper": PEPPER, "admin_api_key": ADMIN}
    assert set(res.kept_from_hosts) == {"api_key_pepper", "admin_api_key"}
    assert res.generated == ()


def test_hosts_set_up_before_the_kept_file_are_read_from_releasy_env():
    res = resolve({}, {"app1": host(None, {"api_key_pepper": PEPPER})}, make=fixed)
    assert res.values == {"api_key_pepper": PEPPER}


def test_a_new_host_gets_the_value_the_others_keep():
    res = resolve({}, {"app1": host({"api_key_pepper": PEPPER}), "app4": host()})
    assert res.values["api_key_pepper"] == PEPPER


@pytest.mark.parametrize("name", ["api_key_pepper", "admin_api_key", "artifact_access_key",
                                  "artifact_secret_key"])
def test_a_different_value_is_refused_naming_the_secret_never_a_value(name):
    with pytest.raises(SecretDrift) as exc:
        resolve({name: OTHER}, {"app1": host({name: PEPPER})})
    text = str(exc.value)
    assert name in text and "--rotate-secret " + name in text and "app1" in text
    assert PEPPER not in text and OTHER not in text


def test_rotation_applies_the_new_value():
    res = resolve({"api_key_pepper": OTHER}, {"app1": host({"api_key_pepper": PEPPER})},
                  ["api_key_pepper"])
    assert res.values["api_key_pepper"] == OTHER and res.rotated == ("api_key_pepper",)


def test_rotating_the_pepper_without_a_value_generates_one():
    res = resolve({}, {"app1": host({"api_key_pepper": PEPPER})}, ["api_key_pepper"],
                  make=fixed)
    assert res.values["api_key_pepper"] == fixed() and res.rotated == ("api_key_pepper",)


def test_rotating_the_admin_key_needs_the_new_value():
    with pytest.raises(SecretDrift, match="set the new value"):
        resolve({}, {"app1": host({"admin_api_key": ADMIN})}, ["admin_api_key"])


def test_unknown_rotation_name_is_refused():
    with pytest.raises(ValueError, match="unknown secret pepper"):
        resolve({}, {}, ["pepper"])


def test_hosts_that_disagree_are_refused():
    with pytest.raises(SecretDrift, match="hold different values"):
        resolve({}, {"app1": host({"api_key_pepper": PEPPER}),
                     "app2": host({"api_key_pepper": OTHER})})
    # kept file and env file of one host disagreeing count too
    with pytest.raises(SecretDrift, match=r"app1 \(releasy.env\)"):
        resolve({}, {"app1": host({"api_key_pepper": PEPPER}, {"api_key_pepper": OTHER})})


def test_an_untrustworthy_kept_file_is_refused():
    with pytest.raises(SecretDrift, match="symlink"):
        resolve({}, {"app1": host(problem=f"{kept.KEPT_FILE} is not a regular file"
                                          " (a symlink?)")})


def test_unquote_inverts_the_env_file_quoting():
    for value in ["plain", 'with "quotes" and \\ and $HOME and `x`', "ünïcode spaces  "]:
        assert kept.unquote_env_value(quote_env_value(value)) == value
    assert kept.unquote_env_value("bare") is None


def _run_probe(tmp_path, monkeypatch_paths):
    script = kept.PROBE
    for old, new in monkeypatch_paths.items():
        script = script.replace(old, new)
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True).stdout


def test_probe_and_parse_on_a_real_shell(tmp_path):
    d, env = tmp_path / "keep", tmp_path / "releasy.env"
    paths = {kept.KEPT_FILE: str(d / "secrets.json"), kept.KEPT_DIR: str(d),
             "/etc/releasy/releasy.env": str(env)}
    env.write_text(f"RELEASY_LOG_LEVEL=\"info\"\nRELEASY_API_KEY_PEPPER={quote_env_value(PEPPER)}\n")
    state = kept.parse_probe(_run_probe(tmp_path, paths))
    assert state.kept is None and state.env == {"api_key_pepper": PEPPER} and not state.problem
    d.mkdir()
    (d / "secrets.json").write_bytes(kept.render({"api_key_pepper": PEPPER}))
    state = kept.parse_probe(_run_probe(tmp_path, paths))
    # owned by whoever runs the tests: root in CI (trusted), anyone else is refused
    import os
    if os.geteuid() == 0:
        assert state.kept == {"api_key_pepper": PEPPER} and not state.problem
    else:
        assert state.problem and "root" in state.problem
    (d / "secrets.json").unlink()
    (d / "secrets.json").symlink_to(env)
    state = kept.parse_probe(_run_probe(tmp_path, paths))
    assert state.kept is None and "symlink" in state.problem
    assert PEPPER not in repr(state)
