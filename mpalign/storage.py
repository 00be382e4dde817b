"""Remote storage (``s3://``, ``gs://``) for datasets, checkpoints and sweeps: the pyarrow filesystems Ray Data and
Ray Train use, opened with short timeouts and checked before any work starts, so an unreachable store or missing
credentials end in one ``error:`` line within seconds instead of a hang or a traceback deep inside Ray.

The endpoint and credentials come from the standard AWS settings every node reads the same way: ``AWS_ENDPOINT_URL``
(or ``AWS_ENDPOINT_URL_S3``) for an S3-compatible store (MinIO, Ceph, a test server), ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` or an instance / pod role, ``AWS_DEFAULT_REGION``. docs/cluster.md has the details.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from mpalign.config import ConfigError

CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 20.0
RETRIES = 2  # attempts in total: a flaky network gets a second chance, a wrong endpoint fails fast
# The whole check's deadline: the AWS SDK's credential chain may probe an instance-metadata endpoint for a long time
# on a machine that is not in the cloud, which no per-request timeout bounds.
CHECK_DEADLINE_S = 45.0


def is_remote(path: str) -> bool:
    return "://" in path


def absolute(path: str) -> str:
    """A local path made absolute (Ray workers run in another working directory); a URI, or "", as it is."""
    if not path or is_remote(path):
        return path
    return str(Path(path).expanduser().resolve())


def filesystem(uri: str):
    """(pyarrow filesystem, path inside it) for a remote URI; S3 with short timeouts and few retries."""
    import pyarrow.fs as pafs

    scheme, _, rest = uri.partition("://")
    if scheme in ("s3", "s3a"):
        options = {"connect_timeout": CONNECT_TIMEOUT_S, "request_timeout": REQUEST_TIMEOUT_S,
                   "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=RETRIES)}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            scheme_, _, host = endpoint.partition("://")
            options.update(endpoint_override=host or scheme_, scheme=scheme_ if host else "https")
        return pafs.S3FileSystem(**options), rest.rstrip("/")
    return pafs.FileSystem.from_uri(uri)


def _no_credentials() -> bool:
    keys = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
    files = [os.path.expanduser(p) for p in ("~/.aws/credentials", "~/.aws/config")]
    return (not any(os.environ.get(k) for k in keys) and not any(os.path.exists(f) for f in files)
            and os.environ.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true")


def check_storage(uri: str, what: str, must_exist: bool = False) -> bool:
    """Raise one clear ConfigError if ``uri`` cannot be reached (or, with ``must_exist``, does not exist);
    return whether it exists. A no-op returning the local answer for local paths."""
    import pyarrow.fs as pafs

    if not is_remote(uri):
        return os.path.exists(uri)
    if uri.startswith(("s3://", "s3a://")) and _no_credentials():
        raise ConfigError(f"{what} '{uri}' is on S3 but no credentials are set: export AWS_ACCESS_KEY_ID and "
                             f"AWS_SECRET_ACCESS_KEY (or AWS_PROFILE / an instance role)")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    where = f" (endpoint {endpoint})" if endpoint else ""
    answer: dict[str, object] = {}

    def look() -> None:
        try:
            fs, path = filesystem(uri)
            answer["info"] = fs.get_file_info(path)
        except (OSError, ValueError) as error:
            answer["error"] = error

    probe = threading.Thread(target=look, daemon=True)  # daemon: a probe stuck in the SDK cannot keep us alive
    probe.start()
    probe.join(CHECK_DEADLINE_S)
    if probe.is_alive():
        raise ConfigError(f"no answer from {what} '{uri}'{where} within {CHECK_DEADLINE_S:g} s: check the endpoint "
                             f"and the credentials (AWS_ACCESS_KEY_ID / AWS_PROFILE / an instance role)")
    if "error" in answer:
        reason = " ".join(str(answer["error"]).split())[:300]
        raise ConfigError(f"cannot reach {what} '{uri}'{where}: {reason}")
    info = answer["info"]
    exists = info.type != pafs.FileType.NotFound
    if must_exist and not exists:
        raise ConfigError(f"{what} '{uri}' does not exist")
    return exists


def remove_tree(uri: str) -> None:
    fs, path = filesystem(uri)
    fs.delete_dir(path)


def local_copy(location: str, scratch: str, what: str) -> str:
    """A local path to the folder ``location``, for readers that take one (``from_pretrained``): ``location`` itself
    when it is local, else ``scratch`` with a copy of it. One ConfigError when the store cannot be reached or the
    folder does not exist."""
    import pyarrow.fs as pafs

    if not is_remote(location):
        return location
    check_storage(location, what, must_exist=True)
    fs, path = filesystem(location)
    pafs.copy_files(path, scratch, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return scratch
