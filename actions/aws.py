"""AWS clients for the worker, and the one place that classifies failures.

Clients are made once per worker thread (boto3 clients are thread-safe but
their creation is not cheap, and a per-thread client keeps connection pools
apart).  botocore's own retries are off: the spool retries, with backoff, for
the whole retry window, and keeps the job on disk meanwhile.
"""

from __future__ import annotations

import socket
from typing import Any

import boto3
import botocore.config
import botocore.exceptions

from mxrules.config import AwsSettings

# A RequestResponse Lambda may run for 30 s before it answers.
LAMBDA_READ_TIMEOUT = 35.0


class Clients:
    """Lazily made boto3 clients for one thread."""

    def __init__(self, settings: AwsSettings, session: boto3.session.Session | None = None
                 ) -> None:
        self.settings = settings
        self.session = session or boto3.session.Session()
        self._clients: dict[str, Any] = {}

    def get(self, service: str) -> Any:
        client = self._clients.get(service)
        if client is None:
            read = self.settings.read_timeout
            if service == "lambda":
                read = max(read, LAMBDA_READ_TIMEOUT)
            config = botocore.config.Config(
                connect_timeout=self.settings.connect_timeout,
                read_timeout=read,
                retries={"total_max_attempts": 1},
                max_pool_connections=4,
            )
            endpoint = self.settings.endpoints.get(service) or self.settings.endpoint_url
            client = self.session.client(service, region_name=self.settings.region,
                                         endpoint_url=endpoint, config=config)
            self._clients[service] = client
        return client

    @property
    def s3(self) -> Any:
        return self.get("s3")

    @property
    def sns(self) -> Any:
        return self.get("sns")

    @property
    def lambda_(self) -> Any:
        return self.get("lambda")


def classify(exc: BaseException) -> str:
    """A bounded label for a failure, for logs and the `reason` metric label.

    Every one of them is retried (a permission error can be mended by the
    operator within the retry window); only PermanentActionError is not.
    """
    from .base import PermanentActionError

    if isinstance(exc, PermanentActionError):
        return "permanent"
    if isinstance(exc, botocore.exceptions.ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if code in {"Throttling", "ThrottlingException", "TooManyRequestsException",
                    "SlowDown", "RequestLimitExceeded"}:
            return "throttled"
        if code in {"AccessDenied", "AccessDeniedException", "AuthorizationError",
                    "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                    "UnrecognizedClientException", "KMS.AccessDeniedException"}:
            return "access-denied"
        if code in {"NoSuchBucket", "NotFound", "ResourceNotFoundException",
                    "NotFoundException"}:
            return "not-found"
        return "server-error" if status >= 500 else "client-error"
    if isinstance(exc, (botocore.exceptions.ConnectTimeoutError,
                        botocore.exceptions.ReadTimeoutError, socket.timeout, TimeoutError)):
        return "timeout"
    if isinstance(exc, (botocore.exceptions.EndpointConnectionError,
                        botocore.exceptions.ConnectionClosedError, ConnectionError)):
        return "connection"
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return "no-credentials"
    if isinstance(exc, OSError):
        return "os-error"
    return "other"
