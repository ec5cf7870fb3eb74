"""A stand-in for upstream's `releasy-server` release tarball, for the integration lab.

`releasy_server.py` is the executable's source (one self-contained file run by the host's
`/usr/bin/python3`); `build.py` bakes a version and its migrations into it and packs it like
upstream's release tarball.
"""
