"""apt's proxy drop-in for ``egress.apt_proxy`` (pure): where it lives, its content, the
shell that reads it and the command that removes it. Under ``egress.restrict`` apt reaches
its sources only through that proxy.
"""
from __future__ import annotations

import shlex

from .shell_read import print_text

__all__ = ["APT_PROXY_CONF", "APT_PROXY_PROBE", "apt_proxy_conf", "remove_argv"]

APT_PROXY_CONF = "/etc/apt/apt.conf.d/80releasy-egress-proxy"
APT_PROXY_PROBE = print_text(shlex.quote(APT_PROXY_CONF))


def apt_proxy_conf(url: str | None) -> bytes | None:
    """apt's drop-in for egress.apt_proxy (http and https sources through it)."""
    if url is None:
        return None
    proxy = url if url.endswith("/") else url + "/"
    return (f"// Managed by releasy-deploy (egress.apt_proxy): apt reaches its sources "
            f"through this proxy.\nAcquire::http::Proxy \"{proxy}\";\n"
            f"Acquire::https::Proxy \"{proxy}\";\n").encode()


def remove_argv() -> list[str]:
    return ["rm", "-f", "--", APT_PROXY_CONF]
