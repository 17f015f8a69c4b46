"""Storage URIs used in a FineTuneJob: s3://, file://, pvc://, hf:// and plain paths."""

from __future__ import annotations

import re
from dataclasses import dataclass

SCHEMES = ("s3", "file", "pvc", "hf")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")

# Loose pattern for the CRD, so the API server rejects obvious junk at admission;
# `parse_uri` gives the precise message.
CRD_PATTERN = r"^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?|file://.+|pvc://[a-z0-9][-a-z0-9]*/.*|hf://[^/]+/[^/]+|[^:]+)$"

# A `..` segment would leave the claim's mount (pvc://claim/../../etc), the cache directory an s3 key
# or hub id is fetched into, or the bucket prefix; a pattern without look-ahead cannot say "no `..`",
# so the CRD checks it in CEL, with the message `parse_uri` gives.
DOT_DOT_MESSAGE = (
    "must not contain '..' path segments (a URI cannot point above its bucket, claim or directory)"
)
DOT_DOT_CEL = "!self.matches('(^|/)[.][.](/|$)')"


@dataclass(frozen=True)
class Uri:
    """A parsed storage URI. `path` is the key (s3), the path in the claim (pvc), the repo id (hf)."""

    scheme: str  # s3 | file | pvc | hf
    netloc: str  # bucket (s3), claim (pvc), "" otherwise
    path: str

    def __str__(self) -> str:
        if self.scheme == "file":
            return self.path
        if self.scheme == "hf":
            return f"hf://{self.path}"
        return f"{self.scheme}://{self.netloc}/{self.path}".rstrip("/")

    def join(self, *parts: str) -> Uri:
        tail = "/".join(p.strip("/") for p in parts if p)
        base = self.path.rstrip("/")
        joined = f"{base}/{tail}" if base else tail
        return Uri(self.scheme, self.netloc, joined)


def parse_uri(text: str) -> Uri:
    """Parse and check a URI; raise ValueError with a user-facing reason."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(
            "must be a non-empty URI (s3://bucket/key, file:///path, pvc://claim/path, hf://org/name)"
        )
    text = text.strip()
    if ".." in text.split("/"):
        raise ValueError(f"{DOT_DOT_MESSAGE}, got {text!r}")
    if "://" not in text:
        if re.match(r"^[A-Za-z][\w+.-]*:", text) and not re.match(r"^[A-Za-z]:[\\/]", text):
            raise ValueError(f"unsupported URI {text!r}; use s3://, file://, pvc://, hf:// or a path")
        return Uri("file", "", text)
    scheme, rest = text.split("://", 1)
    if scheme not in SCHEMES:
        raise ValueError(
            f"unsupported scheme {scheme!r} in {text!r}; use s3://, file://, pvc://, hf:// or a path"
        )
    if scheme == "file":
        if not rest:
            raise ValueError(f"file URI {text!r} has no path")
        return Uri("file", "", rest if rest.startswith("/") else "/" + rest)
    if scheme == "hf":
        if not _HF_ID.match(rest.rstrip("/")):
            raise ValueError(f"hf URI {text!r} must name a hub repo as hf://org/name")
        return Uri("hf", "", rest.rstrip("/"))
    netloc, _, path = rest.partition("/")
    if scheme == "s3":
        if not _BUCKET.match(netloc):
            raise ValueError(f"s3 URI {text!r} has an invalid bucket name {netloc!r}")
        return Uri("s3", netloc, path.strip("/"))
    if not _DNS_LABEL.match(netloc):
        raise ValueError(f"pvc URI {text!r} must start with a PersistentVolumeClaim name (pvc://claim/path)")
    return Uri("pvc", netloc, path.strip("/"))


def pvc_mount_path(claim: str) -> str:
    """Where the operator mounts a PersistentVolumeClaim inside trainer pods."""
    return f"/mnt/pvc/{claim}"
