"""The builtins-only file readers (`commands.shell_read`) and the probes built on them, run
under the real ``sh`` against real files."""
from __future__ import annotations

import ipaddress
import json
import shlex
import shutil
import subprocess

import pytest

from releasy_deploy import audit
from releasy_deploy.commands import apt_proxy, netprobe, ufw, ufw_state
from releasy_deploy.commands.shell_read import (has_line_starting, line_starts_pattern,
                                                print_lines_starting, print_text,
                                                read_first_word)
from releasy_deploy.facts import OsRelease


def _sh(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True)


TRICKY = "a\\b\tc  \n\n  indented\n-n\n%s %d\n$HOME `x` \"q\"\nlast line without newline"


def test_print_text_prints_the_file_and_ends_the_last_line(tmp_path):
    f = tmp_path / "f.conf"
    f.write_text(TRICKY)
    res = _sh(print_text(shlex.quote(str(f))))
    assert (res.returncode, res.stdout) == (0, TRICKY + "\n")
    f.write_text("one\n")
    assert _sh(print_text(shlex.quote(str(f)))).stdout == "one\n"
    f.write_text("")
    assert _sh(print_text(shlex.quote(str(f)))).stdout == ""


def test_print_text_of_a_missing_file_prints_nothing_and_fails(tmp_path):
    res = _sh(print_text(shlex.quote(str(tmp_path / "absent"))) + "; echo after $?")
    assert res.stdout == "after 2\n"


def test_print_text_takes_a_shell_variable(tmp_path):
    f = tmp_path / "with space"
    f.write_text("x\n")
    assert _sh(f"f={shlex.quote(str(f))}; {print_text(chr(34) + '$f' + chr(34))}").stdout == "x\n"


def test_print_lines_starting_is_grep_for_line_prefixes(tmp_path):
    f = tmp_path / "releasy.env"
    f.write_text("A_KEY=1\n#A_KEY=2\n B_KEY=3\nB_KEY=4\nB_KEYS=5\nC=6\nA_KEY=7")
    res = _sh(print_lines_starting(shlex.quote(str(f)), ["A_KEY=", "B_KEY="]))
    assert (res.returncode, res.stdout) == (0, "A_KEY=1\nB_KEY=4\nA_KEY=7\n")
    res = _sh(print_lines_starting(shlex.quote(str(f)), ["NONE="]))
    assert (res.returncode, res.stdout) == (0, "")


@pytest.mark.parametrize("text, found", [
    ("IPV6=no\n", True), ("ipv6=NO\n", True), ("IPV6=nope", True), ("IPV6=yes\n", False),
    ("# IPV6=no\n", False), (" IPV6=no\n", False), ("X=1\nIPV6=No", True), ("", False),
])
def test_has_line_starting_ignoring_case(tmp_path, text, found):
    f = tmp_path / "ufw"
    f.write_text(text)
    res = _sh(has_line_starting(shlex.quote(str(f)), "IPV6=no", ignore_case=True))
    assert res.returncode == (0 if found else 1) and res.stdout == res.stderr == ""


def test_has_line_starting_on_a_missing_file_is_false(tmp_path):
    res = _sh(has_line_starting(shlex.quote(str(tmp_path / "absent")), "IPV6=no"))
    assert res.returncode == 1 and res.stderr == ""


def test_read_first_word(tmp_path):
    f = tmp_path / ".sha256"
    f.write_text("  abc123  tarball.tar.gz\nsecond\n")
    script = f"{read_first_word('sum', shlex.quote(str(f)))}; echo \"[$sum]\""
    assert _sh(script).stdout == "[abc123]\n"
    f.write_text("3")  # no newline
    assert _sh(f"{read_first_word('v', shlex.quote(str(f)))}; echo \"[$v]\"").stdout == "[3]\n"
    absent = shlex.quote(str(tmp_path / "absent"))
    res = _sh(f"v=old; {read_first_word('v', absent)}; echo \"[$v]\"")
    assert (res.stdout, res.stderr) == ("[]\n", "")


def test_names_and_prefixes_are_checked():
    assert line_starts_pattern("IPV6=no", ignore_case=True) == "[Ii][Pp][Vv]6=[Nn][Oo]*"
    for bad in ("", "a*", "a|b", "a b", "$(x)", "a)"):
        with pytest.raises(ValueError):
            line_starts_pattern(bad)
    for bad in ("1x", "a-b", "x;y", ""):
        with pytest.raises(ValueError):
            read_first_word(bad, "/dev/null")


def _moved(script: str, paths: dict[str, str]) -> str:
    for old, new in paths.items():
        script = script.replace(old, new)
    return script


def test_the_ufw_probes_on_real_files(tmp_path):
    conf, defaults = tmp_path / "ufw.conf", tmp_path / "default-ufw"
    rules, rules6 = tmp_path / "user.rules", tmp_path / "user6.rules"
    moved = {ufw_state.UFW_CONF: str(conf), ufw_state.UFW_DEFAULTS: str(defaults),
             ufw.UFW_RULES6: str(rules6), ufw.UFW_RULES: str(rules)}
    probes = {name: _moved(script, moved) for name, script in (
        ("conf", ufw_state.CONF_PROBE), ("rules", ufw.RULES_PROBE),
        ("defaults", ufw_state.DEFAULTS_PROBE))}
    assert _sh(probes["conf"]).returncode == 3 and _sh(probes["rules"]).returncode == 3

    conf.write_text("ENABLED=yes\nLOGLEVEL=low\n")
    defaults.write_text('IPV6=yes\nDEFAULT_INPUT_POLICY="DROP"\nDEFAULT_OUTPUT_POLICY="ACCEPT"')
    rules.write_text("*filter\n### tuple ### allow tcp 22 0.0.0.0/0 any 10.0.0.1 in\nCOMMIT\n")
    rules6.write_text("*filter\n### tuple ### allow tcp 22 ::/0 any ::/0 in\nCOMMIT\n")
    res = _sh(probes["conf"])
    assert res.returncode == 0
    status = ufw_state.parse_conf_probe(res.stdout, res.returncode)
    assert status is not None and status.active and status.defaults["incoming"] == "deny"
    assert _sh(probes["defaults"]).stdout == defaults.read_text() + "\n"
    both = _sh(probes["rules"])
    assert (both.returncode, both.stdout) == (0, rules.read_text() + rules6.read_text())

    defaults.write_text("ipv6=No\n")  # ufw does not filter IPv6: its rules are not read
    only = _sh(probes["rules"])
    assert (only.returncode, only.stdout) == (0, rules.read_text())
    defaults.unlink()  # as before: without the file, both
    assert _sh(probes["rules"]).stdout == rules.read_text() + rules6.read_text()
    defaults.write_text("IPV6=yes\n")
    rules6.unlink()
    assert _sh(probes["rules"]).returncode != 0


def test_os_release_resolvers_and_apt_proxy_probes_on_real_files(tmp_path):
    os_release = tmp_path / "os-release"
    os_release.write_text('PRETTY_NAME="Debian GNU/Linux 13 (trixie)"\nID=debian\nVERSION_ID="13"')
    res = _sh(OsRelease().shell().replace("/etc/os-release", str(os_release)))
    assert OsRelease().parse(res.stdout, res.returncode)["VERSION_ID"] == "13"
    assert OsRelease().parse(*_out(_sh(OsRelease().shell().replace(
        "/etc/os-release", str(tmp_path / "absent"))))) == {}

    resolv, upstream = tmp_path / "resolv.conf", tmp_path / "resolved.conf"
    resolv.write_text("nameserver 127.0.0.53\noptions edns0\n")
    upstream.write_text("nameserver 10.0.0.2\nnameserver 2001:db8::53")
    script = _moved(netprobe.RESOLVERS_PROBE, {"/etc/resolv.conf": str(resolv),
                                               "/run/systemd/resolve/resolv.conf": str(upstream)})
    assert [str(a) for a in netprobe.parse_resolvers(_sh(script).stdout)] == [
        "10.0.0.2", "2001:db8::53"]

    conf = tmp_path / "80proxy"
    script = apt_proxy.APT_PROXY_PROBE.replace(apt_proxy.APT_PROXY_CONF, str(conf))
    assert _sh(script).returncode != 0
    wanted = apt_proxy.apt_proxy_conf("http://10.0.0.9:3128")
    conf.write_bytes(wanted)
    res = _sh(script)
    assert (res.returncode, res.stdout.encode()) == (0, wanted)


def _out(res: subprocess.CompletedProcess) -> tuple[str, int]:
    return res.stdout, res.returncode


def test_the_readers_start_no_program(tmp_path):
    """With nothing on PATH, only the shell's builtins can work: so no process is started."""
    f = tmp_path / "f"
    f.write_text("KEY=1\nIPV6=no\n")
    q = shlex.quote(str(f))
    script = "; ".join([print_text(q), print_lines_starting(q, ["KEY="]),
                        f"{has_line_starting(q, 'IPV6=no')} && echo has",
                        f"{read_first_word('w', q)}; echo \"$w\""])
    res = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True,
                         env={"PATH": str(tmp_path / "nothing")})
    assert (res.returncode, res.stdout, res.stderr) == (
        0, "KEY=1\nIPV6=no\nKEY=1\nhas\nKEY=1\n", "")


@pytest.mark.skipif(not shutil.which("ip"), reason="compared with iproute2's ip")
def test_the_ipv6_probe_finds_what_ip_lists_as_global():
    ours = netprobe.parse_ipv6_addresses(_sh(netprobe.IPV6_PROBE).stdout)
    listed = subprocess.run(["ip", "-6", "-o", "addr", "show", "scope", "global"],
                            capture_output=True, text=True, check=True).stdout
    theirs = {ipaddress.IPv6Address(line.split()[3].split("/")[0])
              for line in listed.splitlines()}
    assert set(ours) == theirs


def test_the_audit_append_makes_the_directory_and_appends_each_record_whole(tmp_path):
    logdir = tmp_path / "log" / "releasy-deploy"
    log = logdir / "audit.log"
    argv = audit.append_argv()
    argv[-2:] = [str(logdir), str(log)]
    records = [json.dumps(audit.record("site", "lab", note="a \\ b $x `y` %s")) + "\n",
               json.dumps(audit.record("deploy.rolling", "lab")) + "\n"]
    for rec in records:
        subprocess.run(argv, input=rec, text=True, check=True)
    assert oct(logdir.stat().st_mode & 0o777) == "0o750"
    assert oct(log.stat().st_mode & 0o777) == "0o640"
    assert log.read_text() == "".join(records)
    assert audit.parse_lines(log.read_text())[0]["note"] == "a \\ b $x `y` %s"
