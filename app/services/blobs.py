"""Blobs: the memory log's large payloads (edit deltas, whole states), kept out of the database.

The database keeps each change's order, kind, size, SHA-256 and the blob's key; the bytes go to a
local directory (by default `blobs/` beside a SQLite database) or to any S3-compatible store (AWS, MinIO)
named by one URL, `MEMOIR_BLOB_URL=s3://bucket/prefix` (credentials and endpoint from the usual
`AWS_*` variables, e.g. `AWS_ENDPOINT_URL` for MinIO).

A blob is written before the row that names it is committed (put-then-commit), so a crash between
the two leaves at most an orphan blob, never a row without its bytes; the new leader's sweep
removes orphans. Keys are the payload's SHA-256, so writing the same payload twice is harmless.

Stored bytes are the payload compressed exactly: the bytes are grouped by their place in each
4-byte word (float32 columns then compress, their exponent bytes being alike), then zstd.
"""

from __future__ import annotations

from dataclasses import dataclass
import hashlib
import os
from pathlib import Path
import tempfile
from typing import Iterator, Protocol
from urllib.parse import urlparse

import numpy as np
import zstandard

from memoir_core.state import fsync_directory

MAGIC = b"MZB1"  # format: magic, the payload's length (8 bytes, little-endian), zstd(shuffled payload)
ZSTD_LEVEL = 3  # zstd's default; other levels were not measured
LOG_PREFIX = "memory-log/"


class BlobUnusable(LookupError):
    """A blob that is missing (pruned, or never written) or whose bytes are not the recorded ones."""


def _shuffle(payload: bytes) -> bytes:
    padded = payload + b"\0" * (-len(payload) % 4)
    return np.frombuffer(padded, dtype=np.uint8).reshape(-1, 4).T.tobytes()


def _unshuffle(shuffled: bytes, length: int) -> bytes:
    return np.frombuffer(shuffled, dtype=np.uint8).reshape(4, -1).T.tobytes()[:length]


def encode(payload: bytes) -> bytes:
    compressed = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(_shuffle(payload))
    return MAGIC + len(payload).to_bytes(8, "little") + compressed


def decode(blob: bytes) -> bytes:
    if blob[:4] != MAGIC:
        raise BlobUnusable("not a MEMOIR blob")
    length = int.from_bytes(blob[4:12], "little")
    try:
        shuffled = zstandard.ZstdDecompressor().decompress(blob[12:], max_output_size=length + 3)
    except zstandard.ZstdError as error:
        raise BlobUnusable(f"the blob does not decompress: {error}") from error
    if len(shuffled) != length + (-length % 4):
        raise BlobUnusable("the blob decompresses to the wrong length")
    return _unshuffle(shuffled, length)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class BlobStore(Protocol):
    url: str

    def put(self, key: str, data: bytes) -> None: ...

    def get(self, key: str) -> bytes:
        """The blob's bytes; BlobUnusable when there is none."""
        ...

    def delete(self, key: str) -> None: ...

    def keys(self, prefix: str) -> Iterator[str]: ...


@dataclass
class LocalBlobs:
    """Blobs as files under one directory; each written to a temporary file, synced and renamed."""

    directory: Path

    @property
    def url(self) -> str:
        return self.directory.resolve().as_uri()

    def _path(self, key: str) -> Path:
        path = (self.directory / key).resolve()
        if not path.is_relative_to(self.directory.resolve()):
            raise ValueError(f"blob key {key!r} leaves the blob directory")
        return path

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, staging = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".partial")
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(staging, path)
            fsync_directory(path.parent)  # put-then-commit: the blob's name must outlive a power cut too
        except BaseException:
            Path(staging).unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as error:
            raise BlobUnusable(f"blob {key} is missing") from error

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def keys(self, prefix: str) -> Iterator[str]:
        root = self.directory.resolve()
        for path in sorted((root / prefix).rglob("*")):
            if path.is_file():
                yield path.relative_to(root).as_posix()


class S3Blobs:
    """Blobs in an S3-compatible bucket under a key prefix, through boto3 (the client reads
    credentials, region and `AWS_ENDPOINT_URL` from the environment as the AWS tools do)."""

    def __init__(self, url: str):
        import boto3  # only S3 deployments need it loaded
        from botocore.config import Config

        parsed = urlparse(url)
        self.url = url
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/") + "/" if parsed.path.strip("/") else ""
        # bounded waits: a store that stops answering holds the worker (which retries) for seconds, not minutes
        config = Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"})
        self.client = boto3.client("s3", config=config)
        self._missing = (self.client.exceptions.NoSuchKey,)

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data)

    def get(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"].read()
        except self._missing as error:
            raise BlobUnusable(f"blob {key} is missing") from error

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.prefix + key)

    def keys(self, prefix: str) -> Iterator[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix + prefix)
        for page in pages:
            for item in page.get("Contents", ()):
                yield item["Key"][len(self.prefix) :]


def open_blob_store(url: str) -> BlobStore:
    """`s3://bucket/prefix`, or a local directory as a path or `file://` URL."""
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"MEMOIR_BLOB_URL {url!r} names no bucket")
        return S3Blobs(url)
    if parsed.scheme == "file":
        return LocalBlobs(Path(parsed.path))
    if parsed.scheme == "":
        return LocalBlobs(Path(url))
    raise ValueError(f"MEMOIR_BLOB_URL {url!r}: use a directory, file:// or s3://")
