"""Storage confinement: where a job submitted to the service may read and write.

    policy = Policy(data_roots=("/srv/data", "s3://corp-data/text"), workspace="/srv/fourfold/ws",
                    reserved=("/srv/fourfold",))
    grant = policy.grant(user="alice", job_id=job_id, admin=False)
    spec = confine_spec(spec, grant)   # every path field resolved, or StorageRefused naming the field
    recheck(spec, grant)               # on each rank, just before it opens anything

A grant is what one job may touch: it reads the data roots, the named corpora (`stdlib`) and its
owner's workspace directory (an admin's jobs: the whole workspace), and writes only under its own
job directory (`<workspace>/<user>/<job id>`, the default `checkpoint.dir`). Nothing under the
service's reserved places (its data directory: the SQLite store, pid file, logs) is reachable,
except the roots an operator put there, and no path may contain one of them.

Paths are resolved the way the engine opens them, then checked: `~` expanded, a relative path taken
from the job's directory, `..` and every symlink resolved (`os.path.realpath`), `file://` read as a
local path. Other fsspec URLs (s3://, gs://, ...) must fall under a root given as a URL of the same
scheme and bucket; a URL with `..`, percent-encoding, a query, credentials or a chained protocol
(`a::b`) is refused outright rather than guessed at. The resolved path replaces the one submitted,
so the ranks open exactly what was checked; `recheck` resolves it again on the rank, so a symlink
swapped in between fails the job instead of escaping.

The fields come from `parallel.config.storage_fields()`, where each path field is marked.
Written here because no library confines paths to roots for both local files and fsspec URLs.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from parallel.config import storage_fields


class StorageRefused(ValueError):
    """A path of a job spec outside what the job may read or write; the message names the field."""


def _is_url(path: str) -> bool:
    return "://" in path or "::" in path


def _inside(path: str, root: str) -> bool:
    """Whether `path` is `root` or below it (both normalised; '/' separated for URLs)."""
    if path == root:
        return True
    return path.startswith(root.rstrip("/") + "/")


def normalise_root(root: str) -> str:
    """A configured root as it is compared: a local one made absolute with symlinks resolved, a
    URL with its trailing slash removed (a bare bucket keeps `s3://bucket`)."""
    root = root.strip()
    if root.startswith("file://"):
        root = root[len("file://") :]
    if _is_url(root):
        url = _check_url("root", root)
        return url.rstrip("/") if not url.endswith("://") else url
    return os.path.realpath(os.path.expanduser(root))


def _check_url(field: str, url: str) -> str:
    """The URL unchanged if it is plain enough to compare by prefix; StorageRefused otherwise."""
    if "::" in url:
        raise StorageRefused(f"{field}={url}: chained fsspec URLs (a::b) are not allowed; give one URL")
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        raise StorageRefused(f"{field}={url}: not a URL of the form scheme://bucket/path")
    if parts.query or parts.fragment or "@" in parts.netloc or "?" in url or "#" in url:
        raise StorageRefused(f"{field}={url}: a URL with a query, fragment or credentials is not allowed")
    if unquote(url) != url:
        raise StorageRefused(f"{field}={url}: percent-encoded characters are not allowed in a URL; write them plainly")
    segments = parts.path.split("/")
    if any(s in (".", "..") for s in segments) or "//" in parts.path:
        raise StorageRefused(f"{field}={url}: '.', '..' or an empty segment in a URL is not allowed")
    return url


@dataclass(frozen=True)
class Grant:
    """What one job may touch: read roots, write roots, and places that stay out of reach."""

    job_dir: str
    read: tuple[str, ...]
    write: tuple[str, ...]
    reserved: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"job_dir": self.job_dir, "read": list(self.read), "write": list(self.write),
                "reserved": list(self.reserved)}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Grant:
        return cls(data["job_dir"], tuple(data["read"]), tuple(data["write"]), tuple(data.get("reserved", ())))

    def resolve(self, field: str, path: str, mode: str) -> str:
        """The path as the engine will open it, when this grant allows `mode` (read/write) there."""
        resolved = self.locate(field, path)
        self._check(field, path, resolved, mode)
        return resolved

    def locate(self, field: str, path: str) -> str:
        """The path as the engine will open it (StorageRefused for a URL too odd to compare)."""
        if path.startswith("file://"):
            if "%" in path:
                raise StorageRefused(f"{field}={path}: percent-encoding is not allowed in a file:// URL")
            path = path[len("file://") :]
        if _is_url(path):
            resolved = _check_url(field, path)
        else:
            expanded = os.path.expanduser(path)
            base = self.job_dir if not _is_url(self.job_dir) else None
            if not os.path.isabs(expanded):
                if base is None:
                    raise StorageRefused(f"{field}={path}: a relative path needs a local workspace; give a URL")
                expanded = os.path.join(base, expanded)
            resolved = os.path.realpath(expanded)
        return resolved

    def _check(self, field: str, path: str, resolved: str, mode: str) -> None:
        allowed = self.write if mode == "write" else self.read + self.write
        if not any(_inside(resolved, root) for root in allowed):
            where = "writes only under" if mode == "write" else "reads only under"
            shown = f" (resolves to {resolved})" if resolved != path else ""
            raise StorageRefused(f"{field}={path}{shown}: outside this job's storage; it {where} {', '.join(allowed)}")
        for place in self.reserved:
            if (_inside(resolved, place) and not any(_inside(resolved, r) and _inside(r, place) for r in allowed)) or (
                _inside(place, resolved) and resolved != place
            ):
                raise StorageRefused(f"{field}={path}: {place} holds the service's own files; no job may reach it")


@dataclass(frozen=True)
class Policy:
    """The operator's storage settings: read-only data roots and the workspace of users and jobs."""

    data_roots: tuple[str, ...]
    workspace: str
    reserved: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_roots", tuple(normalise_root(r) for r in self.data_roots if r.strip()))
        object.__setattr__(self, "workspace", normalise_root(self.workspace))
        object.__setattr__(self, "reserved", tuple(normalise_root(r) for r in self.reserved if r.strip()))

    def user_dir(self, user: str) -> str:
        return _join(self.workspace, user)

    def job_dir(self, user: str, job_id: str) -> str:
        return _join(self.user_dir(user), job_id)

    def grant(self, user: str, job_id: str, admin: bool = False) -> Grant:
        """The job's reads: data roots and its owner's directory (an admin's: the whole workspace);
        its writes: its own directory."""
        own = self.workspace if admin else self.user_dir(user)
        return Grant(self.job_dir(user, job_id), (*self.data_roots, own), (self.job_dir(user, job_id),), self.reserved)


def _join(root: str, name: str) -> str:
    if "/" in name or name in ("", ".", "..") or name.startswith("."):
        raise StorageRefused(f"{name!r}: not usable as a directory name in the workspace")
    return posixpath.join(root, name) if _is_url(root) else os.path.join(root, name)


def _get(spec: dict[str, Any], dotted: str) -> Any:
    section, key = dotted.split(".", 1)
    return (spec.get(section) or {}).get(key)


def confine_spec(spec: dict[str, Any], grant: Grant, default_dir: bool = True) -> dict[str, Any]:
    """A copy of `spec` whose path fields are resolved within the grant (StorageRefused otherwise).
    With `default_dir`, a spec without checkpoint.dir gets the job's directory."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in spec.items()}
    if default_dir and not _get(out, "checkpoint.dir"):
        out.setdefault("checkpoint", {})["dir"] = grant.job_dir
    for dotted, marker in storage_fields().items():
        value = _get(out, dotted)
        if value is None or value in marker.get("keywords", ()):
            continue
        section, key = dotted.split(".", 1)
        out[section][key] = grant.resolve(dotted, str(value), marker["storage"])
    return out


def recheck(spec: dict[str, Any], grant: Grant) -> None:
    """On the rank, before it opens anything: every path still resolves to itself, within the grant
    (a symlink swapped in since the submission is refused, not followed)."""
    for dotted, marker in storage_fields().items():
        value = _get(spec, dotted)
        if value is None or value in marker.get("keywords", ()):
            continue
        now = grant.locate(dotted, str(value))
        if now != value:
            raise StorageRefused(f"{dotted}={value}: now resolves to {now} (a link changed since the job was checked)")
        grant.resolve(dotted, now, marker["storage"])
