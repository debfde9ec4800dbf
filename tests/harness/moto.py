"""moto in server mode on loopback: S3, KMS, SNS (read back through SQS) and a docker-free Lambda.

The server runs from its own venv, ``.venv-moto`` (``./run setup`` makes it): moto 5 needs a
newer botocore than Debian's, while the product and the tests keep using Debian's boto3 1.26
as clients, so what is tested is the client code that ships.

Behaviour of moto worth knowing (moto 5.2.5, server mode):

* Lambda without Docker: moto picks its "lambda simple" backend when its user config says
  ``{"lambda": {"use_docker": false}}``.  There is no environment variable for it; in server
  mode it is set with ``POST /moto-api/config``, which :meth:`MotoServer.start` does on every
  start.  ``POST /moto-api/reset`` keeps that config (it is not backend state).  Functions
  live in the backend selected when they are created, so the config must precede them.
* Every Invoke, whatever its InvocationType (Event too) and whatever the function, even one
  that was never created, pops the next result from ONE queue per account and region, filled
  by ``POST /moto-api/static/lambda-simple/response`` with
  ``{"results": ["...", ...], "region": "us-east-1"}`` (answers 201).  Results must be
  strings: moto encodes them with ``str.encode``.  With the queue empty, Invoke echoes the
  request payload, or returns ``Simple Lambda happy path OK`` when the payload is empty.
  RequestResponse answers 200, Event 202; FunctionError is never set.
* moto records no Lambda invocations.  Its request recorder (``MOTO_ENABLE_RECORDING``,
  ``MOTO_RECORDER_FILEPATH``) appends every request it receives, body included, as a JSON
  line; :meth:`MotoServer.lambda_invocations` reads the Invoke requests back from that file.
* S3 SSE-KMS: put_object with ``ServerSideEncryption="aws:kms"`` stores ``SSEKMSKeyId``
  exactly as given (an ARN stays an ARN, a key id stays a key id) without checking that the
  key exists; without ``SSEKMSKeyId`` no key id is returned at all (AWS would name aws/s3).
* State is in memory: a stopped or restarted server has forgotten everything.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import boto3
from botocore.client import BaseClient
from botocore.config import Config

from harness.ports import free_port
from harness.process import ManagedProcess

REPO_ROOT = Path(__file__).resolve().parents[2]
MOTO_VENV = REPO_ROOT / ".venv-moto"
MOTO_SERVER = MOTO_VENV / "bin" / "moto_server"

REGION = "us-east-1"
ACCOUNT_ID = "123456789012"  # moto's default account
ACCESS_KEY_ID = "testing"
SECRET_ACCESS_KEY = "testing"  # moto accepts any credentials

LAMBDA_ROLE_NAME = "mxrules-test-lambda"
_LAMBDA_TRUST = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Principal": {"Service": "lambda.amazonaws.com"},
            "Action": "sts:AssumeRole",
        }
    ],
}
# Never run: the docker-free backend does not execute code.  Lambda still wants a package.
_LAMBDA_SOURCE = "def handler(event, context):\n    return event\n"

_INVOKE_PATH = re.compile(r"^/2015-03-31/functions/(?P<function>[^/]+)/invocations/?$")
# No proxy from the environment may sit between the tests and a loopback server.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class LambdaInvocation:
    """One Invoke request as moto received it (from its request recording)."""

    function: str
    """FunctionName as the client sent it (name, ARN or partial ARN), URL-decoded."""
    invocation_type: str
    """``RequestResponse`` (also when the header is absent), ``Event`` or ``DryRun``."""
    qualifier: str | None
    payload: bytes

    @property
    def function_name(self) -> str:
        """The bare function name, whichever form ``function`` has."""
        return function_name(self.function)

    def json(self) -> Any:
        """The payload decoded as JSON (the event the function was invoked with)."""
        return json.loads(self.payload)


def function_name(ref: str) -> str:
    """Bare Lambda function name from a name, ``name:qualifier``, ARN or partial ARN."""
    parts = ref.split(":")
    if parts[0] == "arn" and len(parts) >= 7:
        return parts[6]
    if len(parts) >= 3 and parts[1] == "function":
        return parts[2]
    return parts[0]


class MotoServer(ManagedProcess):
    """A ``moto_server`` subprocess on a loopback port, with a docker-free Lambda.

    ``restart()`` keeps the port, so clients made before an outage work after it; the
    server's state is lost then, as with ``reset()``.  The request recording (see
    ``lambda_invocations``) survives a restart and is cleared by ``reset()``.
    """

    name = "moto_server"

    def __init__(
        self,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        workdir: Path | None = None,
        record: bool = True,
        start_timeout: float = 30.0,
    ) -> None:
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.workdir = (
            workdir if workdir is not None else Path(tempfile.mkdtemp(prefix="mxrules-moto-"))
        )
        self.workdir.mkdir(parents=True, exist_ok=True)
        super().__init__(self.workdir / "moto.log")
        self.recording_path = self.workdir / "recording.jsonl"
        self.record = record
        self.start_timeout = start_timeout
        self._clients: dict[str, BaseClient] = {}

    def __repr__(self) -> str:
        return f"MotoServer({self.endpoint_url}, running={self.running})"

    # -- process ---------------------------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        """Start the server and return once it answers, configured for docker-free Lambda."""
        if self.running:
            return
        if not MOTO_SERVER.exists():
            raise FileNotFoundError(f"{MOTO_SERVER} is missing; run ./run setup")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MOTO_"))}
        env["MOTO_PORT"] = str(self.port)  # moto builds some URLs (SQS queue URLs) from it
        if self.record:
            env["MOTO_ENABLE_RECORDING"] = "true"
            env["MOTO_RECORDER_FILEPATH"] = str(self.recording_path)
            self.recording_path.touch()
        self.spawn([str(MOTO_SERVER), "-H", self.host, "-p", str(self.port)],
                   env=env, cwd=self.workdir, start_new_session=True)
        try:
            self.wait_ready(self._configured, self.start_timeout)
        except BaseException:
            self.stop()
            raise

    def _configured(self) -> bool:
        """True once the server answers and applies the docker-free Lambda config."""
        try:
            config = json.loads(self._api("/moto-api/config", {"lambda": {"use_docker": False}}))
        except ValueError:
            return False
        if config.get("lambda", {}).get("use_docker") is not False:
            raise RuntimeError(f"moto did not accept the Lambda config: {config}")
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL at the deadline); safe to call twice.

        Once this returns, the port refuses connections.
        """
        self.terminate(timeout)

    def restart(self) -> None:
        """Stop and start again on the same port; all AWS state is gone afterwards."""
        self.stop()
        self.start()

    def reset(self) -> None:
        """Forget all AWS state (and the request recording) without restarting.

        The docker-free Lambda config survives ``/moto-api/reset``; so does nothing else.
        """
        self._api("/moto-api/reset", {})
        if self.record:
            self._api("/moto-api/recorder/reset-recording", {})

    def __enter__(self) -> MotoServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _api(self, path: str, body: Any = None, timeout: float = 5.0) -> bytes:
        """Call moto's own API (``/moto-api/...``): POST ``body`` as JSON, or GET without."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.endpoint_url + path,
            data=data,
            headers={"Content-Type": "application/json"},
            method="GET" if data is None else "POST",
        )
        with _DIRECT.open(request, timeout=timeout) as response:
            payload: bytes = response.read()
            return payload

    # -- clients ---------------------------------------------------------------------------

    def client(self, service: str) -> BaseClient:
        """A boto3 client (Debian's boto3 in .venv) for this server: no retries, short timeouts.

        Clients are cached per service; they keep working across ``restart()``.
        """
        client = self._clients.get(service)
        if client is None:
            client = boto3.session.Session().client(
                service,
                region_name=REGION,
                endpoint_url=self.endpoint_url,
                aws_access_key_id=ACCESS_KEY_ID,
                aws_secret_access_key=SECRET_ACCESS_KEY,
                config=Config(
                    retries={"total_max_attempts": 1, "mode": "standard"},
                    connect_timeout=2,
                    read_timeout=15,  # above sns_messages' 5 s long polls
                    proxies={},
                ),
            )
            self._clients[service] = client
        return client

    def aws_env(self) -> dict[str, str]:
        """Environment for a process (the product) that talks to this server with boto3.

        botocore 1.29 has no AWS_ENDPOINT_URL: pass ``endpoint_url`` in the product's config.
        """
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }

    # -- S3 and KMS ------------------------------------------------------------------------

    def make_bucket(self, name: str) -> str:
        """Create a bucket (us-east-1, so no location constraint); return its name."""
        self.client("s3").create_bucket(Bucket=name)
        return name

    def make_kms_key(self, description: str = "mxrules test key") -> str:
        """Create a symmetric KMS key; return its ARN."""
        key = self.client("kms").create_key(Description=description)
        arn: str = key["KeyMetadata"]["Arn"]
        return arn

    def s3_keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every key in ``bucket`` under ``prefix``, sorted."""
        keys: list[str] = []
        paginator = self.client("s3").get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            keys.extend(obj["Key"] for obj in page.get("Contents", []))
        return sorted(keys)

    def s3_object(self, bucket: str, key: str) -> tuple[bytes, dict[str, Any]]:
        """The object's bytes and GetObject's other fields.

        The dict has e.g. ServerSideEncryption, SSEKMSKeyId, Metadata (user metadata),
        ContentType, ContentLength; ResponseMetadata is dropped.
        """
        response = self.client("s3").get_object(Bucket=bucket, Key=key)
        body: bytes = response.pop("Body").read()
        response.pop("ResponseMetadata", None)
        return body, dict(response)

    # -- SNS, read back through SQS ----------------------------------------------------------

    def make_topic_with_queue(self, name: str) -> tuple[str, str]:
        """A topic and an SQS queue (same name) subscribed to it; return (topic ARN, queue URL).

        RawMessageDelivery is false: each SQS body is the SNS envelope JSON, whose "Message"
        is the published string and "Subject" the subject (absent when none was given).
        """
        topic_arn: str = self.client("sns").create_topic(Name=name)["TopicArn"]
        sqs = self.client("sqs")
        queue_url: str = sqs.create_queue(QueueName=name)["QueueUrl"]
        queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])[
            "Attributes"
        ]["QueueArn"]
        self.client("sns").subscribe(
            TopicArn=topic_arn,
            Protocol="sqs",
            Endpoint=queue_arn,
            Attributes={"RawMessageDelivery": "false"},
        )
        return topic_arn, queue_url

    def sns_messages(
        self, queue_url: str, count: int = 1, timeout: float = 10.0
    ) -> list[dict[str, Any]]:
        """SNS envelopes from a queue of ``make_topic_with_queue``, deleted once read.

        Long-polls until at least ``count`` arrived (possibly more, in arrival order), or
        raises TimeoutError at the deadline.  ``count=0`` collects for the whole ``timeout``
        and returns what arrived: ``== []`` proves that nothing was published.
        """
        sqs = self.client("sqs")
        deadline = time.monotonic() + timeout
        received: list[dict[str, Any]] = []
        while True:
            if count and len(received) >= count:
                return received
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            response = sqs.receive_message(
                QueueUrl=queue_url,
                MaxNumberOfMessages=10,
                WaitTimeSeconds=max(1, min(5, math.ceil(remaining))),
            )
            messages = response.get("Messages", [])
            received.extend(json.loads(m["Body"]) for m in messages)
            if messages:
                sqs.delete_message_batch(
                    QueueUrl=queue_url,
                    Entries=[
                        {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                        for i, m in enumerate(messages)
                    ],
                )
        if count == 0:
            return received
        raise TimeoutError(
            f"{len(received)} of {count} SNS messages arrived within {timeout:g}s: {received}"
        )

    # -- Lambda (docker-free) --------------------------------------------------------------

    def make_function(self, name: str) -> str:
        """Create a Lambda function (never executed: see the module docstring); return its ARN."""
        iam = self.client("iam")
        try:
            role_arn: str = iam.get_role(RoleName=LAMBDA_ROLE_NAME)["Role"]["Arn"]
        except iam.exceptions.NoSuchEntityException:
            role_arn = iam.create_role(
                RoleName=LAMBDA_ROLE_NAME, AssumeRolePolicyDocument=json.dumps(_LAMBDA_TRUST)
            )["Role"]["Arn"]
        package = io.BytesIO()
        with zipfile.ZipFile(package, "w") as archive:
            archive.writestr("handler.py", _LAMBDA_SOURCE)
        function = self.client("lambda").create_function(
            FunctionName=name,
            Runtime="python3.11",
            Role=role_arn,
            Handler="handler.handler",
            Code={"ZipFile": package.getvalue()},
        )
        arn: str = function["FunctionArn"]
        return arn

    def queue_lambda_results(self, results: Sequence[str | Mapping[str, Any]]) -> None:
        """Append results that the next Invokes return, in order; dicts are sent as JSON.

        The queue is shared by every function in the region and Event invocations consume
        from it too.  Once it is empty, Invoke echoes the request payload.
        """
        encoded = [r if isinstance(r, str) else json.dumps(r) for r in results]
        body = {"results": encoded, "region": REGION, "account_id": ACCOUNT_ID}
        self._api("/moto-api/static/lambda-simple/response", body)

    def lambda_invocations(self, function: str | None = None) -> list[LambdaInvocation]:
        """Every Invoke request the server received (since the last reset), oldest first.

        ``function`` (name or ARN) keeps only that function's.  Requests are listed whether
        or not they succeeded, and those sent to a function that does not exist too.
        """
        if not self.record:
            raise RuntimeError("this MotoServer was made with record=False")
        wanted = None if function is None else function_name(function)
        invocations: list[LambdaInvocation] = []
        with self.recording_path.open("rb") as f:
            for line in f:
                if b"/invocations" not in line:  # cheap filter: S3 bodies can be large
                    continue
                try:
                    entry = json.loads(line)
                except ValueError:  # the line moto is writing right now
                    continue
                invocation = _invocation(entry)
                if invocation is not None and wanted in (None, invocation.function_name):
                    invocations.append(invocation)
        return invocations


def _invocation(entry: Mapping[str, Any]) -> LambdaInvocation | None:
    """A recorded request as a LambdaInvocation, or None for any other request."""
    url = urlsplit(entry.get("url", ""))
    match = _INVOKE_PATH.match(url.path)
    if entry.get("method") != "POST" or match is None:
        return None
    headers = {k.lower(): v for k, v in entry.get("headers", {}).items()}
    body = entry.get("body") or ""
    payload = base64.b64decode(body) if entry.get("body_encoded") else body.encode()
    qualifier = parse_qs(url.query).get("Qualifier", [None])[0]
    return LambdaInvocation(
        function=unquote(match["function"]),
        invocation_type=headers.get("x-amz-invocation-type", "RequestResponse"),
        qualifier=qualifier,
        payload=payload,
    )

