"""Local folders and ``s3://`` prefixes behind one pyarrow filesystem interface.

S3 settings come from the standard AWS environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``/``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL_S3`` or
``AWS_ENDPOINT_URL`` for S3-compatible stores), with the endpoint and region overridable in the
``storage`` config section. Credentials are never copied into configs or logs.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import pyarrow.fs as pafs

if TYPE_CHECKING:
    from pipelines.config import StorageConfig


@dataclass(frozen=True)
class Location:
    """A resolved folder: the filesystem, the path inside it, and the URI the user gave."""

    fs: pafs.FileSystem
    path: str
    uri: str

    def join(self, *parts: str) -> str:
        return posixpath.join(self.path, *parts)

    def child_uri(self, *parts: str) -> str:
        return posixpath.join(self.uri, *parts) if is_s3(self.uri) else str(Path(self.uri, *parts))


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def s3_endpoint(override: str | None = None) -> str | None:
    return override or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def s3_filesystem(endpoint: str | None = None, region: str | None = None) -> pafs.S3FileSystem:
    endpoint = s3_endpoint(endpoint)
    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    kwargs = {"region": region}
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        if endpoint.startswith("http://"):
            kwargs["scheme"] = "http"
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str, endpoint: str | None = None, region: str | None = None) -> Location:
    if is_s3(uri):
        path = uri[len("s3://"):].rstrip("/")
        if not path:
            raise ValueError(f"{uri}: an s3:// URI needs a bucket")
        return Location(s3_filesystem(endpoint, region), path, uri.rstrip("/"))
    path = str(Path(uri).expanduser().resolve())
    return Location(pafs.LocalFileSystem(), path, path)


def locate(uri: str, settings: StorageConfig) -> Location:
    """``resolve`` with the endpoint and region of the config's ``storage`` section."""
    return resolve(uri, settings.s3_endpoint, settings.s3_region)


def exists(location: Location, *parts: str) -> bool:
    return location.fs.get_file_info(location.join(*parts)).type != pafs.FileType.NotFound


def list_files(location: Location, recursive: bool = True) -> list[pafs.FileInfo]:
    """Files under a folder, sorted by path; empty when the folder does not exist."""
    if location.fs.get_file_info(location.path).type == pafs.FileType.NotFound:
        return []
    selector = pafs.FileSelector(location.path, recursive=recursive, allow_not_found=True)
    infos = location.fs.get_file_info(selector)
    return sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)


def relative(location: Location, path: str) -> str:
    return posixpath.relpath(path, location.path)


def read_bytes(location: Location, path: str) -> bytes:
    with location.fs.open_input_stream(path) as stream:
        return stream.read()


def write_bytes(location: Location, name: str, data: bytes) -> None:
    """Write ``name`` under the location so that readers see all of it or nothing.

    S3 objects appear whole on completion (and need no folder markers); locally the bytes go to
    a temporary name first and are renamed into place.
    """
    target = location.join(name)
    if isinstance(location.fs, pafs.LocalFileSystem):
        location.fs.create_dir(posixpath.dirname(target), recursive=True)
        temporary = f"{target}.tmp-{uuid.uuid4().hex}"
        with location.fs.open_output_stream(temporary) as stream:
            stream.write(data)
        location.fs.move(temporary, target)
    else:
        with location.fs.open_output_stream(target) as stream:
            stream.write(data)


def delete_files(location: Location, names: list[str]) -> None:
    """Delete these files under the folder, in this order; nothing else."""
    for name in names:
        location.fs.delete_file(location.join(name))


def overlaps(first: Location, second: Location) -> bool:
    """Whether one folder is, or lies inside, the other (on the same kind of filesystem)."""
    if type(first.fs) is not type(second.fs):
        return False
    a, b = first.path.rstrip("/") + "/", second.path.rstrip("/") + "/"
    return a.startswith(b) or b.startswith(a)


def redact_uri(uri: str) -> str:
    """``uri`` without credentials: no ``user:password@`` and no values of query parameters."""
    parts = urlsplit(uri)
    if not parts.scheme or not parts.netloc and not parts.query:
        return uri
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = "&".join(f"{key}=***" for key, _ in parse_qsl(parts.query, keep_blank_values=True))
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
