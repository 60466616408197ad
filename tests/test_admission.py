"""Unit tests of admission (worker.admission): every record gets an outcome, no broker."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from aiokafka import TopicPartition
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.admission import Admitted, Answered, Limits, admit, check_limits
from worker.answers import UNSERVED
from worker.codec import decode_response, encode_request
from worker.domain import InferenceRequest, Tensor
from worker.errors import RequestError
from worker.formats import PLAIN
from worker.origins import Call, Record
from worker.outgoing import DLQ_HEADER_PREFIX, Destinations, Outgoing, messages
from worker.repository import ModelRepository
from worker.v2 import MAX_ID_BYTES

from .conftest import TEXT_MODELS, configure
from .cycles import cycles_counted

DEST = Destinations("replies", "dlq", "g")
LIMITS = Limits(max_request_bytes=4 << 20, max_request_elements=1_000_000)
ROW = np.arange(64, dtype=np.float32)[None] % 17


def record(
    value: bytes | None, headers: list[tuple[str, bytes]] | None = None, timestamp: int = 1_000
) -> Record:
    return Record(TopicPartition("requests", 0), 5, b"key", value, headers or [], timestamp)


def request(
    rid: str = "r-1",
    model: str = "digits",
    version: str | None = None,
    tensors: list[Tensor] | None = None,
    deadline_ms: int | None = None,
) -> bytes:
    inputs = tensors if tensors is not None else [Tensor.from_numpy("pixels", ROW)]
    return encode_request(InferenceRequest(rid, model, inputs, version, deadline_ms=deadline_ms))


def answered(outcome: Admitted | Answered) -> list[Outgoing]:
    """What is published for a record answered at admission (its reply, dead-letter copy)."""
    assert isinstance(outcome, Answered), outcome
    return [m for answer in outcome.answers for m in messages(DEST, PLAIN, answer)]


def error_of(outcome: Admitted | Answered) -> tuple[str, str]:
    """The code and message of the one error reply a request got at admission."""
    assert isinstance(outcome, Answered), outcome
    [answer] = outcome.answers
    assert answer.failed is None
    assert answer.response is not None
    assert answer.response.error is not None
    return answer.response.error.code, answer.response.error.message


def test_a_valid_request_becomes_a_job_for_its_version(repository: ModelRepository) -> None:
    """Decoded, routed to the default version, validated into arrays, no shadow."""
    outcome = admit(record(request()), repository, LIMITS, DEST, PLAIN, now=42.0)
    assert isinstance(outcome, Admitted)
    job = outcome.job
    assert outcome.shadow is None
    assert (job.model.name, job.model.version) == ("digits", "2")
    assert job.request.id == "r-1"
    assert job.enqueued == 42.0
    assert job.deadline_ms is None
    assert job.comparison is None
    np.testing.assert_array_equal(job.prepared.arrays[0], ROW)


def test_a_named_version_is_served(repository: ModelRepository) -> None:
    """A request naming v1 gets v1."""
    outcome = admit(record(request(version="1")), repository, LIMITS, DEST, PLAIN, now=0.0)
    assert isinstance(outcome, Admitted)
    assert outcome.job.model.version == "1"


def test_deadline_from_the_request_or_the_default_timeout(repository: ModelRepository) -> None:
    """deadline_ms wins; without it, the record timestamp plus default_timeout_ms; else none."""
    timed = Limits(4 << 20, 1_000_000, default_timeout_ms=250)
    own = admit(record(request(deadline_ms=9_999)), repository, timed, DEST, PLAIN, now=0.0)
    default = admit(record(request(), timestamp=1_000), repository, timed, DEST, PLAIN, now=0.0)
    assert isinstance(own, Admitted)
    assert isinstance(default, Admitted)
    assert own.job.deadline_ms == 9_999
    assert default.job.deadline_ms == 1_250


@pytest.mark.parametrize(
    ("value", "code", "words"),
    [
        (request(model="nope"), "NOT_FOUND", "no model named 'nope'"),
        (request(version="9"), "NOT_FOUND", "has no version '9'"),
        (request(tensors=[Tensor.from_numpy("pixels", ROW[:, :10])]), "INVALID_ARGUMENT", "shape"),
        (request(tensors=[Tensor.from_numpy("x", ROW)]), "INVALID_ARGUMENT", "unknown input"),
        (request(tensors=[]), "INVALID_ARGUMENT", "missing input"),
        (
            request(tensors=[Tensor.from_numpy("pixels", ROW * np.float32("nan"))]),
            "INVALID_ARGUMENT",
            "NaN",
        ),
        (
            request(tensors=[Tensor("pixels", "FP32", (1, 64), b"\0" * 10)]),
            "INVALID_ARGUMENT",
            "needs 256 bytes",
        ),
    ],
)
def test_requests_that_cannot_be_served_are_answered_with_a_code(
    repository: ModelRepository, value: bytes, code: str, words: str
) -> None:
    """Unknown model or version, wrong tensors: one error reply with its code, no job."""
    outcome = admit(record(value), repository, LIMITS, DEST, PLAIN, now=0.0)
    got_code, message = error_of(outcome)
    assert got_code == code
    assert words in message


def test_limits_answer_resource_exhausted(repository: ModelRepository) -> None:
    """Over the byte limit or the element limit: RESOURCE_EXHAUSTED naming the setting."""
    value = request()
    small = Limits(max_request_bytes=len(value) - 1, max_request_elements=1_000_000)
    code, message = error_of(admit(record(value), repository, small, DEST, PLAIN, now=0.0))
    assert code == "RESOURCE_EXHAUSTED"
    assert "MAX_REQUEST_BYTES" in message
    few = Limits(max_request_bytes=4 << 20, max_request_elements=63)
    code, message = error_of(admit(record(value), repository, few, DEST, PLAIN, now=0.0))
    assert code == "RESOURCE_EXHAUSTED"
    assert "MAX_REQUEST_ELEMENTS" in message


def test_undecodable_record_is_dead_lettered_and_answered_if_it_has_an_id(
    repository: ModelRepository,
) -> None:
    """Garbage goes to the DLQ; with a correlation_id header, the caller gets an error too."""
    [copy] = answered(admit(record(b"\xc3\x01garbage"), repository, LIMITS, DEST, PLAIN, now=0.0))
    assert copy.is_dead_letter
    assert copy.topic == "dlq"
    assert dict(copy.headers)[DLQ_HEADER_PREFIX + "stage"] == b"DECODE"
    headers = [("correlation_id", b"c-9")]
    copy, error = answered(admit(record(b"", headers), repository, LIMITS, DEST, PLAIN, now=0.0))
    assert copy.is_dead_letter
    assert error.topic == "replies"
    response = decode_response(error.value or b"")
    assert response.id == "c-9"
    assert response.model_name == "", "the record named no model that could be read"
    assert response.error is not None
    assert response.error.code == "INVALID_ARGUMENT"


def text_shadowed(tmp_path: Path) -> ModelRepository:
    """MiniLM served as v1 with v2 (the same files) shadowing it."""
    root = tmp_path / "text"
    for version in ("1", "2"):
        (root / "minilm" / version).mkdir(parents=True)
        for name in ("model.pt2", "tokenizer.json"):
            (root / "minilm" / version / name).symlink_to(TEXT_MODELS / "minilm" / "1" / name)
    config = (TEXT_MODELS / "minilm" / "config.toml").read_text()
    (root / "minilm" / "config.toml").write_text(
        config + '\n[routing]\ndefault_version = "1"\nshadow = "2"\n'
    )
    return ModelRepository.load(root)


def test_text_requests_are_tokenised_at_admission_unless_the_worker_defers_it(
    tmp_path: Path, text_repository: ModelRepository
) -> None:
    """admit() tokenises by default; tokenize=False leaves strings pending, the shadow's too."""
    del text_repository  # fails the test loudly when MiniLM is not exported
    repository = text_shadowed(tmp_path)
    value = request("t-1", "minilm", tensors=[Tensor.from_strings("text", ["hello there"])])
    now = admit(record(value), repository, LIMITS, DEST, PLAIN, now=0.0)
    later = admit(record(value), repository, LIMITS, DEST, PLAIN, now=0.0, tokenize=False)
    assert isinstance(now, Admitted)
    assert isinstance(later, Admitted)
    assert now.shadow is not None
    assert later.shadow is not None
    for job in (now.job, now.shadow):
        assert not job.prepared.pending
        assert (job.prepared.rows, job.prepared.length, job.prepared.tokens) == (1, 4, 4)
    assert now.shadow.model.version == "2"
    assert now.shadow.prepared is not now.job.prepared, "the shadow tokenises with its own"
    for job in (later.job, later.shadow):
        assert job.prepared.pending
        assert job.prepared.arrays[0].tolist() == [b"hello there"]


def test_strings_the_primary_refuses_are_answered_when_a_shadow_is_configured(
    tmp_path: Path, text_repository: ModelRepository
) -> None:
    """Strings the primary refuses are answered with the primary tokenizer's reason."""
    del text_repository
    repository = text_shadowed(tmp_path)
    bad = request("t-2", "minilm", tensors=[Tensor.from_strings("text", [b"\xff"])])
    code, message = error_of(admit(record(bad), repository, LIMITS, DEST, PLAIN, now=0.0))
    assert code == "INVALID_ARGUMENT"
    assert "not UTF-8" in message


def test_shadow_copy_only_for_requests_naming_no_version(repo_dir: Path) -> None:
    """With shadow = 2: unnamed requests get a shadow copy sharing one comparison."""
    configure(repo_dir, "digits", '[routing]\ndefault_version = "1"\nshadow = "2"')
    repository = ModelRepository.load(repo_dir)
    outcome = admit(record(request()), repository, LIMITS, DEST, PLAIN, now=0.0)
    assert isinstance(outcome, Admitted)
    assert outcome.shadow is not None
    assert outcome.job.model.version == "1"
    assert outcome.shadow.model.version == "2"
    assert outcome.shadow.is_shadow
    assert not outcome.job.is_shadow
    comparison = outcome.job.comparison
    assert comparison is not None
    assert comparison is outcome.shadow.comparison
    assert comparison.output == "label"
    named = admit(record(request(version="1")), repository, LIMITS, DEST, PLAIN, now=0.0)
    assert isinstance(named, Admitted)
    assert named.shadow is None


def test_no_shadow_onto_the_version_that_answers(repo_dir: Path) -> None:
    """A split that picks the shadow version itself gets no copy (it would compare with itself)."""
    configure(repo_dir, "digits", '[routing]\nsplit = { "2" = 1 }\nshadow = "2"')
    repository = ModelRepository.load(repo_dir)
    outcome = admit(record(request()), repository, LIMITS, DEST, PLAIN, now=0.0)
    assert isinstance(outcome, Admitted)
    assert outcome.job.model.version == "2"
    assert outcome.shadow is None


@pytest.mark.parametrize(
    ("dims", "code"),
    [
        ([2**63 - 1] * 230, "INVALID_ARGUMENT"),  # too many dimensions to count (the poison pill)
        ([2**63 - 1] * 100_000, "INVALID_ARGUMENT"),
        ([2**63 - 1] * 32, "RESOURCE_EXHAUSTED"),  # as many as allowed, each huge
        ([2**62, 2**62], "RESOURCE_EXHAUSTED"),
        ([2**63 - 1, 0], "INVALID_ARGUMENT"),  # no elements: then the data length is wrong
        ([5, -1], "INVALID_ARGUMENT"),
    ],
)
def test_hostile_shapes_are_answered_quickly_with_a_short_message(
    repository: ModelRepository, dims: list[int], code: str
) -> None:
    """Shapes with huge or many dimensions get a coded reply; counting never blows up."""
    tensor = Tensor("pixels", "FP32", tuple(dims), b"\0" * 4)
    got_code, message = error_of(admit(record(request(tensors=[tensor])), repository, LIMITS,
                                       DEST, PLAIN, now=0.0))  # fmt: skip
    assert got_code == code
    assert len(message) < 500


def test_an_empty_id_is_invalid_and_the_reply_carries_the_header_id(
    repository: ModelRepository,
) -> None:
    """Five zero bytes decode as a request with no id: INVALID_ARGUMENT, never a NOT_FOUND."""
    [message] = answered(admit(record(b"\0" * 5), repository, LIMITS, DEST, PLAIN, now=0.0))
    response = decode_response(message.value or b"")
    assert response.error is not None
    assert response.error.code == "INVALID_ARGUMENT"
    assert "id is empty" in response.error.message
    assert response.id == "", "no header: the reply keeps the (empty) id it was given"
    headers = [("correlation_id", b"from-header")]
    [message] = answered(
        admit(record(b"\0" * 5, headers), repository, LIMITS, DEST, PLAIN, now=0.0)
    )
    assert decode_response(message.value or b"").id == "from-header"
    assert dict(message.headers)["correlation_id"] == b"from-header"


def test_request_strings_of_any_length_are_cut_in_messages(repository: ModelRepository) -> None:
    """A megabyte model name or input name is named in the error, cut short."""
    code, message = error_of(admit(record(request(model="m" * 1_000_000)), repository, LIMITS,
                                   DEST, PLAIN, now=0.0))  # fmt: skip
    assert code == "NOT_FOUND"
    assert len(message) < 500
    assert "more characters" in message
    tensor = Tensor.from_numpy("x" * 1_000_000, ROW)
    code, message = error_of(admit(record(request(tensors=[tensor])), repository, LIMITS,
                                   DEST, PLAIN, now=0.0))  # fmt: skip
    assert code == "INVALID_ARGUMENT"
    assert len(message) < 1000


@pytest.mark.parametrize("length", [MAX_ID_BYTES + 1, 1_000_000])
def test_an_id_over_the_bound_is_invalid_and_answered_under_its_first_part(
    repository: ModelRepository, length: int
) -> None:
    """Over MAX_ID_BYTES characters: INVALID_ARGUMENT under a cut id, never a megabyte header."""
    long_id = "é" * length
    [message] = answered(
        admit(record(request(rid=long_id)), repository, LIMITS, DEST, PLAIN, now=0.0)
    )
    response = decode_response(message.value or b"")
    assert response.error is not None
    assert response.error.code == "INVALID_ARGUMENT"
    assert f"request id is {length} characters" in response.error.message
    assert response.id == long_id[:MAX_ID_BYTES]
    assert len(dict(message.headers)["correlation_id"]) <= 4 * MAX_ID_BYTES
    ok = admit(record(request(rid="é" * MAX_ID_BYTES)), repository, LIMITS, DEST, PLAIN, now=0.0)
    assert isinstance(ok, Admitted), "an id of exactly the bound is served"


def test_an_undecodable_record_is_answered_under_a_bounded_header_id(
    repository: ModelRepository,
) -> None:
    """A megabyte correlation_id header on garbage: the error reply carries its first part."""
    headers = [("correlation_id", b"c" * 1_000_000)]
    copy, error = answered(
        admit(record(b"\xc3\x01junk", headers), repository, LIMITS, DEST, PLAIN, now=0.0)
    )
    assert copy.is_dead_letter
    assert decode_response(error.value or b"").id == "c" * MAX_ID_BYTES


def test_a_reply_topic_not_allowed_is_refused_before_the_model_runs(
    repository: ModelRepository,
) -> None:
    """reply_to naming the requests topic: INVALID_ARGUMENT on the default topic, no job."""
    policy = Destinations("replies", "dlq", "g", requests_topic="requests")
    headers = [("reply_to", b"requests")]
    [message] = answered(
        admit(record(request(), headers), repository, LIMITS, policy, PLAIN, now=0.0)
    )
    assert message.topic == "replies"
    response = decode_response(message.value or b"")
    assert response.error is not None
    assert response.error.code == "INVALID_ARGUMENT"
    assert "'requests' is not allowed" in response.error.message
    assert message.meta is not None
    assert message.meta.refused_topic


def test_metric_labels_come_from_the_repository_not_the_request(
    repository: ModelRepository,
) -> None:
    """NOT_FOUND is labelled UNSERVED; an invalid request to a served model names its version."""
    [missing] = answered(
        admit(record(request(model="x" * 50)), repository, LIMITS, DEST, PLAIN, now=0.0)
    )
    assert missing.meta is not None
    assert missing.meta.labels == (UNSERVED, UNSERVED)
    tensor = Tensor.from_numpy("pixels", ROW[:, :3])
    [invalid] = answered(admit(record(request(tensors=[tensor])), repository, LIMITS, DEST, PLAIN,
                               now=0.0))  # fmt: skip
    assert invalid.meta is not None
    assert invalid.meta.labels == ("digits", "2")


HYPOTHESIS = settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@HYPOTHESIS
@given(value=st.one_of(st.none(), st.binary(max_size=512)))
def test_any_bytes_get_an_outcome(repository: ModelRepository, value: bytes | None) -> None:
    """Whatever the value, admission returns an outcome and never raises."""
    outcome = admit(record(value), repository, LIMITS, DEST, PLAIN, now=0.0)
    if isinstance(outcome, Answered):
        assert outcome.answers


DATATYPES = ["FP32", "FP64", "INT64", "INT8", "UINT8", "BOOL", "FP16"]


@HYPOTHESIS
@given(
    model=st.sampled_from(["digits", "iris", "", "x" * 300]),
    version=st.one_of(st.none(), st.sampled_from(["", "1", "2", "3", "-1", "01"])),
    name=st.sampled_from(["pixels", "features", "", "other"]),
    datatype=st.sampled_from(DATATYPES),
    shape=st.one_of(
        st.lists(st.integers(min_value=0, max_value=70), min_size=0, max_size=4),
        st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=300),
    ),
    extra=st.integers(min_value=-3, max_value=3),
)
def test_structurally_valid_requests_get_an_outcome(  # noqa: PLR0917 - hypothesis passes them
    repository: ModelRepository,
    model: str,
    version: str | None,
    name: str,
    datatype: str,
    shape: list[int],
    extra: int,
) -> None:
    """Random names, versions, datatypes, shapes and byte lengths: a job or a coded answer."""
    size = {"FP32": 4, "FP64": 8, "INT64": 8, "FP16": 2}.get(datatype, 1)
    length = min(max(0, math.prod(shape) * size + extra), 1 << 20) if len(shape) < 8 else 4
    tensor = Tensor(name, datatype, tuple(shape), b"\x01" * length)
    value = encode_request(InferenceRequest("id", model, [tensor], version))
    outcome = admit(record(value), repository, LIMITS, DEST, PLAIN, now=0.0)
    if isinstance(outcome, Answered):
        code, message = error_of(outcome)
        assert code in {"NOT_FOUND", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}
        assert len(message) < 2000
    else:
        assert outcome.job.model.name == model
        assert outcome.job.prepared.arrays[0].shape == tuple(shape)


def test_an_unexpected_exception_becomes_a_dead_letter_copy(
    repository: ModelRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last-resort guard: a bug inside admission dead-letters the record, never raises."""

    def broken(*_: object) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(repository, "route", broken)
    [copy] = answered(admit(record(request()), repository, LIMITS, DEST, PLAIN, now=0.0))
    headers = dict(copy.headers)
    assert copy.is_dead_letter
    assert headers[DLQ_HEADER_PREFIX + "stage"] == b"ADMISSION"
    assert headers[DLQ_HEADER_PREFIX + "exception.class.name"] == b"builtins.ZeroDivisionError"


def test_limits_are_inclusive_and_count_every_input() -> None:
    """Exactly at the byte and element limits passes; the count spans all inputs; 0 is 0."""
    five = Tensor("a", "FP32", (1, 5), b"")
    six = Tensor("b", "FP32", (2, 3), b"")
    value = encode_request(InferenceRequest("id", "m", [five, five]))
    exact = Limits(max_request_bytes=len(value), max_request_elements=10)
    check_limits(exact, record(value), InferenceRequest("id", "m", [five, five]))
    check_limits(
        exact, record(value), InferenceRequest("id", "m", [Tensor("z", "FP32", (0, 99), b"")])
    )
    with pytest.raises(RequestError) as info:
        check_limits(exact, record(value), InferenceRequest("id", "m", [five, six]))
    assert info.value.code == "RESOURCE_EXHAUSTED"
    with pytest.raises(RequestError) as info:
        check_limits(exact, record(value + b"x"), InferenceRequest("id", "m", [five]))
    assert info.value.code == "RESOURCE_EXHAUSTED"
    one = Tensor("c", "FP32", (1,), b"")
    with pytest.raises(RequestError, match="more than 10 elements"):
        check_limits(exact, record(value), InferenceRequest("id", "m", [five, five, one]))


@pytest.mark.parametrize("value", [b"\xc3\x01garbage", b"\0" * 5])
def test_a_correlation_id_header_that_is_not_utf8_is_still_answered(
    repository: ModelRepository, value: bytes
) -> None:
    """Undecodable or id-less records with a non-UTF-8 correlation_id header get a reply."""
    outgoing = answered(admit(record(value, [("correlation_id", b"\xff\xfe1")]), repository,
                              LIMITS, DEST, PLAIN, now=0.0))  # fmt: skip
    replies = [o for o in outgoing if not o.is_dead_letter]
    assert len(replies) == 1
    assert decode_response(replies[0].value or b"").id == "\ufffd\ufffd1"
    assert dict(replies[0].headers)["correlation_id"] == b"\xff\xfe1"


def test_a_direct_request_is_held_to_the_byte_limit_by_its_tensors(
    repository: ModelRepository,
) -> None:
    """REST/gRPC requests have no record value: their tensor bytes count against the limit."""
    rows = Tensor.from_numpy("pixels", np.zeros((100, 64), np.float32))
    big = InferenceRequest("d", "digits", [rows])
    source = Call("rest", 1, big, [], 1_000, lambda _response, _headers: None)
    small = Limits(max_request_bytes=1_000, max_request_elements=1_000_000)
    code, message = error_of(admit(source, repository, small, DEST, PLAIN, now=0.0))
    assert code == "RESOURCE_EXHAUSTED"
    assert "request is 25600 bytes" in message
    assert isinstance(admit(source, repository, LIMITS, DEST, PLAIN, now=0.0), Admitted)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    value=st.binary(max_size=2_000),
    request_id=st.sampled_from([None, b"c-1"]),
    content_type=st.sampled_from([None, b"application/json", b"application/x-protobuf"]),
)
def test_a_refused_record_leaves_no_garbage_cycle(
    repository: ModelRepository, value: bytes, request_id: bytes | None, content_type: bytes | None
) -> None:
    """Any bytes in any format, answered and dropped: nothing of them waits for the collector."""
    headers = [("correlation_id", request_id)] if request_id is not None else []
    headers += [("content-type", content_type)] if content_type is not None else []
    with cycles_counted() as left:
        for _ in range(20):
            outcome = admit(record(value, headers), repository, LIMITS, DEST, PLAIN, now=0.0)
            if isinstance(outcome, Answered):
                for answer in outcome.answers:
                    messages(DEST, PLAIN, answer)
            del outcome
    assert left[0] < 20, f"{left[0]} objects in cycles after 20 records (a kept traceback?)"


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=30)
@given(strings=st.lists(st.binary(min_size=1, max_size=64), min_size=1, max_size=4))
def test_refused_strings_leave_no_garbage_cycle(
    text_repository: ModelRepository, strings: list[bytes]
) -> None:
    """Any strings for a text model, tokenised now or batch-wise: no cycle left behind."""
    value = request("t-3", "minilm", tensors=[Tensor.from_strings("text", strings)])
    with cycles_counted() as left:
        for _ in range(10):
            later = admit(record(value), text_repository, LIMITS, DEST, PLAIN, now=0.0)
            pending = admit(
                record(value), text_repository, LIMITS, DEST, PLAIN, now=0.0, tokenize=False
            )
            if isinstance(pending, Admitted):
                pending.job.model.tokenize_many([pending.job.prepared])
            del later, pending
    assert left[0] < 10, f"{left[0]} objects in cycles after 10 requests (a kept traceback?)"
