"""User-facing errors: each says what is wrong, where, and how to fix it."""


class FineTuneError(Exception):
    """Base class for errors a user can act on (bad config, bad data, missing model)."""


class ConfigError(FineTuneError):
    """The run configuration is invalid. ``problems`` lists every offending key."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"Invalid {source} ({len(problems)} problem(s)):\n{lines}")


class DataError(FineTuneError):
    """The training data cannot be used as given."""


class ModelError(FineTuneError):
    """The base model cannot be found, downloaded or loaded."""


class HubError(FineTuneError):
    """Publishing to the Hugging Face hub failed in a way the user must fix."""


class TransientError(FineTuneError):
    """A failure outside the user's control that the same run may not meet again: the network,
    the hub or the object store answering late or with 429/5xx, a training rank that died or
    stopped answering. The Flyte tasks turn it into a retry (``FlyteRecoverableException``);
    every other ``FineTuneError`` is the user's to fix, and retrying it would only burn time."""


# HTTP statuses that mean "try again later", not "your request is wrong"
TRANSIENT_HTTP = {408, 409, 425, 429, 500, 502, 503, 504}
# Messages of torch.distributed (gloo, NCCL, c10d store) when a peer rank died or hung
_DEAD_PEER = (
    "connection closed by peer", "connection reset by peer", "broken pipe", "timed out", "timeout",
    "nccl communicator was aborted", "socket timeout", "connection refused", "no route to host",
)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or anything in its cause/context chain) is a transient fault.

    Deliberately conservative: an exception counts as transient only when its type says
    so (network and timeout errors, HTTP 408/429/5xx from the hub or an object store, a
    distributed collective that lost its peer). Config, data and out-of-memory errors are
    never transient: the next attempt would fail the same way.
    """
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if _is_transient_one(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _is_transient_one(e: BaseException) -> bool:
    import errno

    if isinstance(e, TransientError):
        return True
    if isinstance(e, (FineTuneError, MemoryError)) or type(e).__name__ in ("OutOfMemoryError", "OutOfMemory"):
        return False
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    if isinstance(e, OSError) and e.errno in (errno.ECONNRESET, errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EHOSTUNREACH,
                                             errno.ENETUNREACH, errno.EPIPE, errno.ECONNABORTED):
        return True
    status = _http_status(e)
    if status is not None:
        return status in TRANSIENT_HTTP
    name = type(e).__name__
    module = type(e).__module__ or ""
    # requests / httpx / urllib3 / aiohttp / botocore transport failures, by name to avoid importing them
    if name in ("ConnectTimeout", "ReadTimeout", "ConnectError", "ReadError", "RemoteProtocolError", "ProtocolError",
                "NewConnectionError", "MaxRetryError", "ClientConnectionError", "ClientConnectorError",
                "ServerDisconnectedError", "ClientPayloadError", "EndpointConnectionError", "ConnectTimeoutError",
                "ReadTimeoutError", "ConnectionClosedError", "IncompleteRead", "ChunkedEncodingError",
                "ConnectionError", "Timeout", "LocalEntryNotFoundError"):
        return name != "LocalEntryNotFoundError" or "offline" not in str(e).lower()
    if module.startswith("torch.distributed") or name in ("DistBackendError", "DistNetworkError", "DistStoreError"):
        return True
    if isinstance(e, RuntimeError) and any(s in str(e).lower() for s in _DEAD_PEER) and (
        "gloo" in str(e).lower() or "nccl" in str(e).lower() or "c10d" in str(e).lower()
    ):
        return True
    return False


def _http_status(e: BaseException) -> int | None:
    """The HTTP status of a hub (requests/httpx) or object-store (botocore, gcsfs) error, if it carries one."""
    response = getattr(e, "response", None)
    status = getattr(response, "status_code", None)
    if isinstance(status, int):
        return status
    if isinstance(response, dict):  # botocore ClientError
        meta = response.get("ResponseMetadata", {})
        if isinstance(meta.get("HTTPStatusCode"), int):
            return meta["HTTPStatusCode"]
    code = getattr(e, "code", None)  # gcsfs HttpError
    if isinstance(code, int) and 100 <= code < 600 and type(e).__name__ == "HttpError":
        return code
    return None
