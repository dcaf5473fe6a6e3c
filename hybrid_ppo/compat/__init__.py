"""Where hybrid_ppo reaches into a library's private internals: one module per library, each
naming the version it was checked against, so an upgrade has one file to read and
tests/test_compat.py to run. An attribute that is gone raises `UpstreamChanged`, never a silent
default."""

from __future__ import annotations


class UpstreamChanged(RuntimeError):
    """A library's internals moved: a bug for us to fix against the new version, not a user error."""

    def __init__(self, library: str, version: str, checked: str, what: str):
        super().__init__(f"{library} {version}: {what} (hybrid_ppo/compat was checked against {checked})")


def require(obj: object, name: str, library: str, version: str, checked: str, owner: str):
    """`obj.name`, or `UpstreamChanged` naming the owner and the attribute."""
    try:
        return getattr(obj, name)
    except AttributeError:
        raise UpstreamChanged(library, version, checked, f"{owner} has no attribute {name!r}") from None
