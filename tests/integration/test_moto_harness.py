"""The moto harness against a real moto server, with Debian's boto3 1.26 as the client."""

from __future__ import annotations

import json
import socket

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from harness.moto import MotoServer, function_name


def test_kms_encrypted_put_and_get(moto_server: MotoServer) -> None:
    bucket = moto_server.make_bucket("mxrules-mail")
    key_arn = moto_server.make_kms_key()
    assert key_arn.startswith("arn:aws:kms:us-east-1:")
    s3 = moto_server.client("s3")
    s3.put_object(
        Bucket=bucket,
        Key="incoming/one.eml",
        Body=b"Subject: hi\r\n\r\nbody\r\n",
        ServerSideEncryption="aws:kms",
        SSEKMSKeyId=key_arn,
        Metadata={"rule": "r1"},
    )
    s3.put_object(Bucket=bucket, Key="other/two.eml", Body=b"x")

    body, meta = moto_server.s3_object(bucket, "incoming/one.eml")

    assert body == b"Subject: hi\r\n\r\nbody\r\n"
    assert meta["ServerSideEncryption"] == "aws:kms"
    assert meta["SSEKMSKeyId"] == key_arn
    assert meta["Metadata"] == {"rule": "r1"}
    assert moto_server.s3_keys(bucket) == ["incoming/one.eml", "other/two.eml"]
    assert moto_server.s3_keys(bucket, prefix="incoming/") == ["incoming/one.eml"]


def test_sse_kms_key_id_is_returned_as_given(moto_server: MotoServer) -> None:
    """moto echoes SSEKMSKeyId verbatim: a bare key id is not turned into an ARN."""
    bucket = moto_server.make_bucket("mxrules-ids")
    key_id = moto_server.make_kms_key().rsplit("/", 1)[1]
    moto_server.client("s3").put_object(
        Bucket=bucket, Key="k", Body=b"x", ServerSideEncryption="aws:kms", SSEKMSKeyId=key_id
    )
    assert moto_server.s3_object(bucket, "k")[1]["SSEKMSKeyId"] == key_id


def test_sns_publish_is_read_back_from_sqs(moto_server: MotoServer) -> None:
    topic_arn, queue_url = moto_server.make_topic_with_queue("mxrules-events")
    sns = moto_server.client("sns")
    sns.publish(TopicArn=topic_arn, Subject="mail received", Message=json.dumps({"n": 1}))
    sns.publish(TopicArn=topic_arn, Subject="second", Message="plain text")

    envelopes = moto_server.sns_messages(queue_url, count=2, timeout=10)

    assert [e["Subject"] for e in envelopes] == ["mail received", "second"]
    assert json.loads(envelopes[0]["Message"]) == {"n": 1}
    assert envelopes[1]["Message"] == "plain text"
    assert {e["TopicArn"] for e in envelopes} == {topic_arn}
    assert {e["Type"] for e in envelopes} == {"Notification"}
    # Read messages are deleted; count=0 waits the whole timeout for stragglers.
    assert moto_server.sns_messages(queue_url, count=0, timeout=1) == []


def test_sns_messages_times_out(moto_server: MotoServer) -> None:
    _, queue_url = moto_server.make_topic_with_queue("mxrules-silent")
    with pytest.raises(TimeoutError, match="0 of 1 SNS messages"):
        moto_server.sns_messages(queue_url, count=1, timeout=1)


def test_lambda_request_response_returns_queued_results_in_order(
    moto_server: MotoServer,
) -> None:
    arn = moto_server.make_function("mxrules-hook")
    assert arn == "arn:aws:lambda:us-east-1:123456789012:function:mxrules-hook"
    moto_server.queue_lambda_results(["first", {"disposition": "CONTINUE"}])
    moto_server.queue_lambda_results(["third"])
    lam = moto_server.client("lambda")

    answers = []
    for n in range(4):
        response = lam.invoke(FunctionName="mxrules-hook", Payload=json.dumps({"n": n}))
        assert response["StatusCode"] == 200
        assert "FunctionError" not in response
        answers.append(response["Payload"].read())

    # Queue empty: moto echoes the request payload.
    assert answers == [b"first", b'{"disposition": "CONTINUE"}', b"third", b'{"n": 3}']
    empty = lam.invoke(FunctionName=arn)["Payload"].read()
    assert empty == b"Simple Lambda happy path OK"

    invocations = moto_server.lambda_invocations("mxrules-hook")
    assert [i.json() for i in invocations[:4]] == [{"n": n} for n in range(4)]
    assert {i.invocation_type for i in invocations} == {"RequestResponse"}
    assert invocations[4].function == arn
    assert invocations[4].payload == b""


def test_lambda_event_invocations_succeed_and_are_recorded(moto_server: MotoServer) -> None:
    arn = moto_server.make_function("mxrules-async")
    other = moto_server.make_function("mxrules-other")
    lam = moto_server.client("lambda")

    response = lam.invoke(
        FunctionName=arn, InvocationType="Event", Payload=json.dumps({"event": "stored"})
    )
    assert response["StatusCode"] == 202
    lam.invoke(FunctionName=other, Payload=b"{}")

    (invocation,) = moto_server.lambda_invocations("mxrules-async")
    assert invocation.invocation_type == "Event"
    assert invocation.function == arn
    assert invocation.function_name == "mxrules-async"
    assert invocation.json() == {"event": "stored"}
    assert invocation.qualifier is None
    assert [i.function_name for i in moto_server.lambda_invocations()] == [
        "mxrules-async",
        "mxrules-other",
    ]


def test_lambda_result_queue_is_shared_and_event_invocations_consume_it(
    moto_server: MotoServer,
) -> None:
    moto_server.make_function("mxrules-a")
    moto_server.make_function("mxrules-b")
    moto_server.queue_lambda_results(["for-a", "for-b", "third"])
    lam = moto_server.client("lambda")

    lam.invoke(FunctionName="mxrules-a", InvocationType="Event", Payload=b"{}")
    second = lam.invoke(FunctionName="mxrules-b", Payload=b"{}")["Payload"].read()

    assert second == b"for-b"


def test_lambda_unknown_function_is_not_an_error_in_moto(moto_server: MotoServer) -> None:
    """moto's docker-free Invoke never looks the function up: assert on the recorded name."""
    response = moto_server.client("lambda").invoke(FunctionName="never-created", Payload=b"1")
    assert response["StatusCode"] == 200
    assert [i.function for i in moto_server.lambda_invocations()] == ["never-created"]


@pytest.mark.parametrize(
    ("ref", "name"),
    [
        ("fn", "fn"),
        ("fn:live", "fn"),
        ("123456789012:function:fn", "fn"),
        ("arn:aws:lambda:us-east-1:123456789012:function:fn", "fn"),
        ("arn:aws:lambda:us-east-1:123456789012:function:fn:7", "fn"),
    ],
)
def test_function_name(ref: str, name: str) -> None:
    assert function_name(ref) == name


def _refuses_connections(server: MotoServer) -> bool:
    try:
        with socket.create_connection((server.host, server.port), timeout=1):
            return False
    except ConnectionRefusedError:
        return True


def test_restart_refuses_connections_while_stopped(moto_server: MotoServer) -> None:
    s3 = moto_server.client("s3")  # made before the outage, like the product's clients
    moto_server.make_bucket("mxrules-before")
    port = moto_server.port

    moto_server.stop()
    assert not moto_server.running
    assert _refuses_connections(moto_server)
    with pytest.raises(EndpointConnectionError):
        s3.list_buckets()

    moto_server.start()
    assert moto_server.port == port
    assert not _refuses_connections(moto_server)
    # State is lost with the process; the docker-free Lambda config is applied again.
    assert s3.list_buckets()["Buckets"] == []
    moto_server.make_function("mxrules-after")
    moto_server.queue_lambda_results(["after restart"])
    answer = moto_server.client("lambda").invoke(FunctionName="mxrules-after", Payload=b"{}")
    assert answer["Payload"].read() == b"after restart"

    moto_server.restart()
    assert moto_server.running and moto_server.port == port
    assert s3.list_buckets()["Buckets"] == []


def test_reset_forgets_state_but_keeps_docker_free_lambda(moto_server: MotoServer) -> None:
    moto_server.make_bucket("mxrules-gone")
    moto_server.make_function("mxrules-gone")
    moto_server.queue_lambda_results(["left over"])
    lam = moto_server.client("lambda")
    lam.invoke(FunctionName="mxrules-gone", InvocationType="Event", Payload=b"{}")
    moto_server.queue_lambda_results(["left over"])

    moto_server.reset()

    assert moto_server.client("s3").list_buckets()["Buckets"] == []
    with pytest.raises(ClientError, match="ResourceNotFoundException"):
        lam.get_function(FunctionName="mxrules-gone")
    assert moto_server.lambda_invocations() == []
    moto_server.make_function("mxrules-gone")
    # The queue was emptied (the payload is echoed) and Lambda still runs without Docker.
    assert lam.invoke(FunctionName="mxrules-gone", Payload=b'"echo"')["Payload"].read() == (
        b'"echo"'
    )
