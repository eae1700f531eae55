"""The object store of run artifacts (``MOEJOBS_ARTIFACT_URL=s3://bucket/prefix``), used by the
workers (upload checkpoints and files, download a checkpoint to resume) and the API (archives,
presigned links, deleting a run's objects).

Keys, below the URL's prefix (README: Object store)::

    runs/<run id>/<checkpoint name>/<file path inside the folder>
    runs/<run id>/files/<metrics.csv | router.csv | events.jsonl | train.log>

The endpoint, region and credentials come from the standard AWS environment variables
(``AWS_ENDPOINT_URL``, ``AWS_REGION``/``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``), which boto3 reads itself; ``MOEJOBS_ARTIFACT_PUBLIC_URL`` is the
endpoint presigned URLs name (one a browser can reach). boto3 is imported on first use only, so
a deployment without a store never loads it.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from service.settings import Settings

log = logging.getLogger("moejobs.artifacts")

#: Key part (below ``runs/<run id>/``) of the files synced during a run.
FILES = "files"


class StoreError(Exception):
    """The object store failed (unreachable, refused, an object missing); the message says
    which operation and the client's reason."""


def parse_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> ``("bucket", "prefix/")`` (``""`` without a prefix).
    Raises ValueError for another scheme or no bucket."""
    if not url.startswith("s3://"):
        raise ValueError("expected s3://bucket/prefix")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError("expected s3://bucket/prefix: no bucket")
    prefix = prefix.strip("/")
    return bucket, (prefix + "/" if prefix else "")


def run_prefix(run_id: uuid.UUID | str) -> str:
    """The key prefix (relative to the store's prefix) of one run's objects."""
    return f"runs/{run_id}/"


def checkpoint_prefix(run_id: uuid.UUID | str, name: str) -> str:
    """The key prefix of one checkpoint folder of a run."""
    return f"runs/{run_id}/{name}/"


class ArtifactStore:
    """One bucket and prefix of an S3-compatible store. Keys given to the methods are relative
    to the prefix; every failure of the store is raised as :class:`StoreError`."""

    def __init__(self, url: str, *, public_url: str | None = None) -> None:
        self.url = url
        self.bucket, self.prefix = parse_url(url)
        self.public_url = public_url
        self._client: Any = None
        self._public_client: Any = None

    # -- clients ------------------------------------------------------------------------------

    def _make_client(self, endpoint_url: str | None) -> Any:
        import boto3
        from botocore.config import Config

        config = Config(
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=10,
            read_timeout=60,
            signature_version="s3v4",
        )
        kwargs: dict[str, Any] = {"config": config}
        if endpoint_url:
            kwargs["endpoint_url"] = endpoint_url
        session = boto3.session.Session()
        client = session.client("s3", **kwargs)
        if "amazonaws.com" not in client.meta.endpoint_url:
            # Another S3-compatible store (MinIO, Garage, SeaweedFS, a compose host name):
            # path-style keys, since bucket.<host> names resolve nowhere there.
            kwargs["config"] = config.merge(Config(s3={"addressing_style": "path"}))
            client = session.client("s3", **kwargs)
        return client

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = self._make_client(None)  # AWS_ENDPOINT_URL, if set
        return self._client

    def _key(self, key: str) -> str:
        return self.prefix + key.lstrip("/")

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except (BotoCoreError, ClientError) as error:
            raise StoreError(f"object store: {what}: {error}") from error

    # -- the interface ------------------------------------------------------------------------

    def put_file(self, path: Path, key: str) -> None:
        """Upload the file ``path`` as ``key``. Raises StoreError, OSError (unreadable file)."""
        self._call(f"upload {key}", self.client.upload_file, str(path), self.bucket, self._key(key))

    def put_folder(self, folder: Path, prefix: str) -> int:
        """Upload every regular file under ``folder`` as ``prefix + relative path``; returns the
        number of files. An interrupted call leaves some objects: the caller records the folder
        only after this returns."""
        count = 0
        for root, dirs, files in os.walk(folder):
            dirs.sort()
            for name in sorted(files):
                path = Path(root, name)
                if path.is_symlink() or not path.is_file():
                    continue
                rel = path.relative_to(folder).as_posix()
                self.put_file(path, prefix.rstrip("/") + "/" + rel)
                count += 1
        return count

    def list(self, prefix: str) -> list[tuple[str, int]]:
        """``(key relative to the store's prefix, size in bytes)`` of every object under
        ``prefix``, sorted by key."""
        found: list[tuple[str, int]] = []
        paginator = self.client.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix))
        for page in self._call(f"list {prefix}", list, pages):
            for obj in page.get("Contents", []):
                found.append((obj["Key"][len(self.prefix) :], int(obj["Size"])))
        return sorted(found)

    def get_folder(self, prefix: str, dest: Path) -> int:
        """Download every object under ``prefix`` into the folder ``dest`` (created; its
        relative paths are the keys below ``prefix``). Written to a temporary sibling first
        and renamed into place, so ``dest`` appears complete or not at all. Returns the number
        of files; raises StoreError when ``prefix`` holds no object."""
        prefix = prefix.rstrip("/") + "/"
        objects = self.list(prefix)
        if not objects:
            raise StoreError(f"object store: nothing under {prefix}")
        tmp = dest.with_name(f".{dest.name}.download-{uuid.uuid4().hex[:8]}")
        try:
            for key, _size in objects:
                rel = key[len(prefix) :]
                target = (tmp / rel).resolve()
                if not target.is_relative_to(tmp.resolve()):
                    raise StoreError(f"object store: key {key} leaves its folder")
                target.parent.mkdir(parents=True, exist_ok=True)
                self._call(
                    f"download {key}",
                    self.client.download_file,
                    self.bucket,
                    self._key(key),
                    str(target),
                )
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return len(objects)

    def get_file(self, key: str, path: Path) -> None:
        """Download object ``key`` to ``path`` (through a temporary sibling, renamed into
        place). Raises StoreError (a missing object among them)."""
        tmp = path.with_name(f".{path.name}.download-{uuid.uuid4().hex[:8]}")
        try:
            self._call(
                f"download {key}", self.client.download_file, self.bucket, self._key(key), str(tmp)
            )
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def open(self, key: str) -> BinaryIO:
        """A readable stream of the object ``key`` (close it after use)."""
        answer = self._call(
            f"read {key}", self.client.get_object, Bucket=self.bucket, Key=self._key(key)
        )
        body: BinaryIO = answer["Body"]
        return body

    def iter_chunks(self, key: str, chunk: int = 1 << 20) -> Iterator[bytes]:
        """The bytes of object ``key`` in chunks of at most ``chunk`` bytes."""
        body = self.open(key)
        try:
            while data := body.read(chunk):
                yield data
        finally:
            body.close()

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix``; returns how many there were."""
        keys = [key for key, _ in self.list(prefix)]
        for start in range(0, len(keys), 1000):
            batch = [{"Key": self._key(k)} for k in keys[start : start + 1000]]
            self._call(
                f"delete {prefix}",
                self.client.delete_objects,
                Bucket=self.bucket,
                Delete={"Objects": batch, "Quiet": True},
            )
        return len(keys)

    def ensure_bucket(self) -> bool:
        """Create the bucket unless it exists already; True when this call created it.
        Idempotent: compose's one-shot ``bucket`` service runs it at every start
        (``python -m service.artifacts``); a bucket another starter created meanwhile
        (``BucketAlreadyOwnedByYou``) counts as there. Raises StoreError (unreachable, or a
        bucket these credentials may not use)."""
        from botocore.exceptions import ClientError

        def code(error: StoreError) -> str | None:
            cause = error.__cause__
            if isinstance(cause, ClientError):
                return str(cause.response.get("Error", {}).get("Code"))
            return None

        try:
            self._call(f"open bucket {self.bucket}", self.client.head_bucket, Bucket=self.bucket)
            return False
        except StoreError as error:
            if code(error) not in ("404", "NoSuchBucket", "NotFound"):
                raise
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        region = self.client.meta.region_name
        if region and region != "us-east-1":  # us-east-1 refuses a location constraint
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self._call(f"create bucket {self.bucket}", self.client.create_bucket, **kwargs)
        except StoreError as error:
            if code(error) != "BucketAlreadyOwnedByYou":
                raise
            return False
        return True

    def presign(self, key: str, expires_seconds: int = 3600, filename: str | None = None) -> str:
        """A presigned GET URL of ``key`` valid ``expires_seconds``, naming the public endpoint
        (``MOEJOBS_ARTIFACT_PUBLIC_URL``) when set, else the one the workers use."""
        if self._public_client is None:
            self._public_client = (
                self._make_client(self.public_url) if self.public_url else self.client
            )
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key)}
        if filename:
            params["ResponseContentDisposition"] = f'attachment; filename="{filename}"'
        url: str = self._call(
            f"presign {key}",
            self._public_client.generate_presigned_url,
            "get_object",
            Params=params,
            ExpiresIn=expires_seconds,
        )
        return url


def store_for(settings: Settings) -> ArtifactStore | None:
    """The store ``settings.artifact_url`` names; None when it is unset (artifacts stay in
    ``RUNS_DIR`` only, as without a store)."""
    if not settings.artifact_url:
        return None
    return ArtifactStore(settings.artifact_url, public_url=settings.artifact_public_url)


def delete_run_objects(settings: Settings, run_id: uuid.UUID | str) -> int:
    """Delete every object of run ``run_id`` (``runs/<run id>/``) when a store is set; returns
    how many. A store failure is logged, not raised: the run is already deleted and its
    objects are left over (nothing refers to them)."""
    store = store_for(settings)
    if store is None:
        return 0
    try:
        return store.delete_prefix(run_prefix(run_id))
    except StoreError as error:
        log.warning("run %s: deleting its objects failed: %s", run_id, error)
        return 0


def run_file_key(run_id: uuid.UUID | str, name: str) -> str:
    """The key of a run's synced file ``name`` (``metrics.csv``, ``train.log`` ...)."""
    return f"{run_prefix(run_id)}{FILES}/{name}"


def fetch_run_file(settings: Settings, run_id: uuid.UUID | str, name: str, dest: Path) -> bool:
    """Download the synced copy of the run's file ``name`` to ``dest`` when a store is set;
    False when there is no store, no such object, or the store fails (logged)."""
    store = store_for(settings)
    if store is None:
        return False
    try:
        store.get_file(run_file_key(run_id, name), dest)
    except StoreError as error:
        log.info("run %s: no stored %s: %s", run_id, name, error)
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    """``python -m service.artifacts``: create the bucket of ``MOEJOBS_ARTIFACT_URL`` unless it
    exists, waiting up to ``--wait`` seconds (default 120) for the store to answer (compose's
    ``bucket`` service starts beside the store). Exit 0 when the bucket is there (or no store
    is set), 1 when the store never answered or refused."""
    import argparse
    import time

    from service.settings import get_settings

    parser = argparse.ArgumentParser(prog="python -m service.artifacts", description=main.__doc__)
    parser.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the store")
    args = parser.parse_args(argv)
    store = store_for(get_settings())
    if store is None:
        print("MOEJOBS_ARTIFACT_URL is not set: no bucket to create")
        return 0
    deadline = time.monotonic() + args.wait
    while True:
        try:
            created = store.ensure_bucket()
        except StoreError as error:
            if time.monotonic() >= deadline:
                print(f"error: {error}")
                return 1
            time.sleep(2.0)
            continue
        print(f"bucket {store.bucket}: {'created' if created else 'already there'}")
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
