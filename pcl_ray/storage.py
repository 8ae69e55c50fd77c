"""One storage layer for everything a run persists: checkpoints, final state, the run registry, compare and
tune outputs, evaluation exports.

``ray.storage_path`` is a local folder or a URI. URIs go through pyarrow filesystems, the same ones Ray Train
uses for its checkpoints, so one setting decides where every byte of a run lives:

- ``/abs/path`` or ``rel/path``: a folder on this machine's disk (refused on a multi-node cluster: other
  nodes cannot see it);
- ``file:///abs/path``: a shared file system mounted at the same path on every node (NFS, EFS, Lustre);
- ``s3://bucket/prefix``: Amazon S3 or an S3-compatible store; ``ray.storage_endpoint`` (or the
  ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` environment variables) overrides the endpoint, and the
  credentials come from the usual AWS chain (environment, instance profile), never from the config;
- ``gs://bucket/prefix``: Google Cloud Storage.

Paths handed to the methods here are relative to the storage root and use ``/``.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .config import ConfigError

REMOTE_SCHEMES = ("s3", "gs", "gcs")
KEY = "ray.storage_path"


def default_root() -> Path:
    """Where runs go when ``ray.storage_path`` is not set: ``runs/`` in the home (:mod:`pcl_ray.paths`)."""
    from .paths import home

    return home() / "runs"


def _endpoint(explicit: str | None) -> str | None:
    return explicit or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _s3_filesystem(endpoint: str | None):
    from pyarrow import fs as pafs

    kwargs: dict[str, Any] = {"connect_timeout": 10, "request_timeout": 60}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        if not parsed.hostname:
            raise ConfigError(f"ray.storage_endpoint: expected a URL such as http://10.0.0.1:9000, got {endpoint!r}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme or "https"
        kwargs.setdefault("region", "us-east-1")  # S3-compatible stores rarely care; pyarrow needs one
        kwargs["force_virtual_addressing"] = False
    return pafs.S3FileSystem(**kwargs)


@dataclass(frozen=True)
class Storage:
    """A storage root: a pyarrow filesystem and the root's path inside it.

    Attributes:
        uri: the root as the user wrote it, normalised (``s3://bucket/prefix``, ``/abs/path``).
        fs: the pyarrow filesystem.
        root: the root's path inside ``fs`` (``bucket/prefix`` for object stores, an absolute path locally).
        kind: ``"local"`` (this machine's disk), ``"shared"`` (``file://``: a mount every node has) or
            ``"remote"`` (an object store).
    """

    uri: str
    fs: Any
    root: str
    kind: str

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_uri(cls, uri: str | os.PathLike | None, endpoint: str | None = None, create: bool = True) -> "Storage":
        """Parse ``ray.storage_path`` (None = the default local folder). Raises ConfigError on a bad value."""
        from pyarrow import fs as pafs

        if uri is None or str(uri).strip() == "":
            path, kind = default_root(), "local"
        else:
            text = str(uri).strip()
            scheme = urlparse(text).scheme.lower() if "://" in text else ""
            if scheme in REMOTE_SCHEMES:
                parsed = urlparse(text)
                bucket, prefix = parsed.netloc, parsed.path.strip("/")
                if not bucket:
                    raise ConfigError(f"{KEY}: expected {scheme}://BUCKET/PREFIX, got {text!r} (no bucket)")
                root = f"{bucket}/{prefix}" if prefix else bucket
                if scheme == "s3":
                    fs = _s3_filesystem(_endpoint(endpoint))
                else:
                    try:
                        fs = pafs.GcsFileSystem()
                    except Exception as exc:  # pyarrow built without GCS
                        raise ConfigError(f"{KEY}: gs:// needs pyarrow with GCS support ({exc})") from None
                clean = f"{'gs' if scheme == 'gcs' else scheme}://{root}"
                return cls(uri=clean, fs=fs, root=root, kind="remote")
            if scheme == "file":
                path, kind = Path(urlparse(text).path), "shared"
            elif scheme:
                raise ConfigError(f"{KEY}: unsupported scheme {scheme!r} in {text!r}; expected a local path, "
                                  "file:///shared/mount, s3://bucket/prefix or gs://bucket/prefix")
            else:
                path, kind = Path(text), "local"
        path = path.expanduser().resolve()
        if create:
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"{KEY}: cannot create folder {path}: {exc.strerror or exc}") from None
        shown = path.as_uri() if kind == "shared" else str(path)
        return cls(uri=shown, fs=pafs.LocalFileSystem(), root=str(path), kind=kind)

    @classmethod
    def from_config(cls, cfg, create: bool = True) -> "Storage":
        return cls.from_uri(cfg.ray.storage_path, cfg.ray.storage_endpoint, create=create)

    # ------------------------------------------------------------------ paths
    @property
    def is_local(self) -> bool:
        """True when only this machine sees the root (a plain local folder)."""
        return self.kind == "local"

    @property
    def on_local_disk(self) -> bool:
        """True when the root is a folder of this machine's file system (local or a shared mount)."""
        return self.kind in ("local", "shared")

    def path(self, *parts: str) -> str:
        """The filesystem path of ``parts`` under the root."""
        rel = "/".join(p.strip("/") for p in parts if p)
        return f"{self.root.rstrip('/')}/{rel}" if rel else self.root

    def uri_of(self, *parts: str) -> str:
        rel = "/".join(p.strip("/") for p in parts if p)
        return f"{self.uri.rstrip('/')}/{rel}" if rel else self.uri

    def local_path(self, *parts: str) -> Path:
        """``parts`` as a local Path (only for roots on this machine's file system)."""
        if not self.on_local_disk:
            raise ValueError(f"{self.uri} is not on the local file system")
        return Path(self.path(*parts))

    def sub(self, *parts: str) -> "Storage":
        """A Storage rooted at ``parts`` below this one."""
        return Storage(uri=self.uri_of(*parts), fs=self.fs, root=self.path(*parts), kind=self.kind)

    def ray_kwargs(self) -> dict[str, Any]:
        """``storage_path`` / ``storage_filesystem`` for Ray Train's and Tune's RunConfig."""
        if self.on_local_disk:
            return {"storage_path": self.root}
        return {"storage_path": self.root, "storage_filesystem": self.fs}

    # ------------------------------------------------------------------ queries
    def _info(self, rel: str):
        return self.fs.get_file_info(self.path(rel))

    def exists(self, rel: str) -> bool:
        from pyarrow import fs as pafs

        return self._info(rel).type != pafs.FileType.NotFound

    def is_file(self, rel: str) -> bool:
        from pyarrow import fs as pafs

        return self._info(rel).type == pafs.FileType.File

    def is_dir(self, rel: str) -> bool:
        from pyarrow import fs as pafs

        return self._info(rel).type == pafs.FileType.Directory

    def list(self, rel: str = "") -> list[tuple[str, bool, float]]:
        """Entries directly under ``rel``: ``(name, is_dir, mtime seconds or 0)``, sorted by name."""
        from pyarrow import fs as pafs

        selector = pafs.FileSelector(self.path(rel), allow_not_found=True, recursive=False)
        out = []
        for info in self.fs.get_file_info(selector):
            mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
            out.append((info.base_name, info.type == pafs.FileType.Directory, mtime))
        return sorted(out)

    # ------------------------------------------------------------------ reading
    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_text(rel))

    def download(self, rel: str, dest: str | os.PathLike) -> Path:
        """Copy the file ``rel`` to the local path ``dest`` (written under a temporary name, then renamed)."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            with self.fs.open_input_stream(self.path(rel)) as src, open(tmp, "wb") as out:
                while chunk := src.read(8 << 20):
                    out.write(chunk)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    # ------------------------------------------------------------------ writing (never half-written)
    def write_bytes(self, rel: str, data: bytes) -> str:
        """Write ``data`` to ``rel``: readers see the old file or the whole new one, never a part.

        Locally: a temporary name in the same folder, then an atomic rename. Object stores publish an
        object only when its upload completes, so there the object is written in place.
        """
        if not self.on_local_disk:
            target = self.path(rel)
            self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            with self.fs.open_output_stream(target) as f:
                f.write(data)
            return target
        return self._replace_local(rel, lambda out: out.write(data))

    def _replace_local(self, rel: str, fill) -> str:
        """Write a local file through ``fill(open binary file)`` under a temporary name, then rename it."""
        target = self.path(rel)
        parent = target.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.{target.rsplit('/', 1)[1]}.{uuid.uuid4().hex[:8]}.part"
        try:
            with open(tmp, "wb") as f:
                fill(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return target

    def write_text(self, rel: str, text: str) -> str:
        return self.write_bytes(rel, text.encode("utf-8"))

    def write_json(self, rel: str, obj: Any, indent: int | None = 1) -> str:
        return self.write_text(rel, json.dumps(obj, indent=indent))

    def upload(self, local: str | os.PathLike, rel: str) -> str:
        """Copy the local file ``local`` to ``rel`` (atomically, as :meth:`write_bytes`)."""
        local = Path(local)
        if not self.on_local_disk or local.stat().st_size < (256 << 20):
            return self.write_bytes(rel, local.read_bytes())

        def stream(out) -> None:  # large local copies: never the whole file in memory
            with open(local, "rb") as src:
                while chunk := src.read(8 << 20):
                    out.write(chunk)

        return self._replace_local(rel, stream)

    def upload_dir(self, local: str | os.PathLike, rel: str) -> list[str]:
        """Copy every file under the local folder ``local`` to ``rel`` (relative layout kept)."""
        local = Path(local)
        written = []
        for p in sorted(local.rglob("*")):
            if p.is_file():
                written.append(self.upload(p, f"{rel}/{p.relative_to(local).as_posix()}"))
        return written

    def copy_from(self, src_fs, src_path: str, rel: str) -> str:
        """Copy one file from another pyarrow filesystem (e.g. a Ray Train checkpoint's) to ``rel``."""
        with src_fs.open_input_stream(src_path) as f:
            buf = io.BytesIO()
            while chunk := f.read(8 << 20):
                buf.write(chunk)
        return self.write_bytes(rel, buf.getvalue())

    def delete(self, rel: str) -> None:
        from pyarrow import fs as pafs

        info = self._info(rel)
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(rel))
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path(rel))

    # ------------------------------------------------------------------ checks
    def check_writable(self) -> None:
        """Write, read back and delete a probe object; ConfigError naming ``ray.storage_path`` if that fails.

        Catches a bucket that does not exist, denied access and an unreachable endpoint before any run
        starts (the S3 client's connect timeout bounds the wait).
        """
        probe = f".pcl_ray/.probe-{uuid.uuid4().hex[:12]}"
        try:
            self.write_bytes(probe, b"pcl-ray storage probe")
            if self.read_bytes(probe) != b"pcl-ray storage probe":
                raise OSError("read back different bytes")
            self.delete(probe)
        except ConfigError:
            raise
        except Exception as exc:  # pyarrow raises OSError subclasses with the store's own message
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"{KEY}: cannot write to {self.uri}: {message}") from None
