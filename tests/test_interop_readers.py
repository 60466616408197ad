"""Replies read by Avro implementations that share no code with the worker's (fastavro).

Apache Avro's Java library (``BinaryMessageDecoder``, fed straight from the broker by the Kafka
Java client: tests/clients/java/ReplyReader.java) and its Python one (the ``avro`` package) each
hold only the current ``schemas/inference_response.avsc``, no history: every reply, numeric or
strings, outputs or error, must decode, and decode to what the worker's Python client read.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import re
import shutil
import struct
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import avro.io
import avro.schema
import hypothesis
import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, Phase, example, given
from hypothesis import strategies as st

from worker.client import InferenceClient
from worker.codec import SOE_MARKER, decode_response, encode_response, schema_dir
from worker.domain import BYTES, DATATYPES, ErrorInfo, InferenceResponse, Tensor, Timing
from worker.errors import ErrorCode
from worker.kafka import ensure_topics, make_producer
from worker.repository import ModelRepository
from worker.settings import Settings

from .conftest import ROOT, TEXT_MODELS, changed, running_worker
from .test_codec import crc64_avro

sys.path.insert(0, str(ROOT / "dev"))
from local_kafka import resolve_jars

JAVA = ROOT / "tests" / "clients" / "java"
RESPONSE_SCHEMA = schema_dir() / "inference_response.avsc"
TestSet = tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]


# What a reply is, as plain data every reader can be compared on. Tensor data by length and
# sha256 (BYTES elements also one by one, hex), parameters with their union branch (doubles as
# their exact bits, so NaN compares).


def parameter_view(value: object) -> dict[str, Any]:
    """A parameter value and the Avro union branch a reader got it as."""
    if isinstance(value, bool):
        return {"type": "boolean", "value": value}
    if isinstance(value, int):
        return {"type": "long", "value": value}
    if isinstance(value, float):
        return {"type": "double", "bits": struct.pack(">d", value).hex()}
    assert isinstance(value, str), type(value)
    return {"type": "string", "value": value}


def split_strings(data: bytes) -> list[str] | None:
    """A BYTES tensor's elements as hex, parsed here (4-byte little-endian length, bytes)."""
    elements, at = [], 0
    while at < len(data):
        if at + 4 > len(data):
            return None
        size = int.from_bytes(data[at : at + 4], "little")
        if at + 4 + size > len(data):
            return None
        elements.append(data[at + 4 : at + 4 + size].hex())
        at += 4 + size
    return elements


def tensor_view(name: str, datatype: str, shape: list[int], data: bytes) -> dict[str, Any]:
    view: dict[str, Any] = {
        "name": name,
        "datatype": datatype,
        "shape": shape,
        "length": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    if datatype == BYTES:
        view["elements"] = split_strings(data)
    return view


def expected_view(reply: InferenceResponse) -> dict[str, Any]:
    """The view of a reply as the worker's Python code holds it."""
    error, timing, parameters = reply.error, reply.timing, reply.parameters
    view: dict[str, Any] = {
        "id": reply.id,
        "model_name": reply.model_name,
        "model_version": reply.model_version,
        "outputs": [tensor_view(t.name, t.datatype, list(t.shape), t.data) for t in reply.outputs],
        "error": None if error is None else {"code": error.code, "message": error.message},
        "timing": None
        if timing is None
        else {
            "queue_us": timing.queue_us,
            "compute_us": timing.compute_us,
            "batch_size": timing.batch_size,
        },
        "parameters": None
        if parameters is None
        else {k: parameter_view(v) for k, v in parameters.items()},
    }
    for tensor, seen in zip(reply.outputs, view["outputs"], strict=True):
        if tensor.datatype == BYTES:  # our own parser of strings agrees with the test's
            ours = [bytes(e).hex() for e in tensor.to_numpy().ravel()]
            assert seen["elements"] == ours
    return view


def record_view(record: dict[str, Any]) -> dict[str, Any]:
    """The view of a reply as a generic Avro reader decoded it (the ``avro`` package)."""
    parameters = record["parameters"]
    return {
        "id": record["id"],
        "model_name": record["model_name"],
        "model_version": record["model_version"],
        "outputs": [
            tensor_view(t["name"], t["datatype"], list(t["shape"]), t["data"])
            for t in record["outputs"]
        ],
        "error": record["error"],
        "timing": record["timing"],
        "parameters": None
        if parameters is None
        else {k: parameter_view(v) for k, v in parameters.items()},
    }


# Replies of every shape the schema allows (strings valid Unicode, as Avro strings must be).

TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)
LONG = st.integers(-(2**63), 2**63 - 1)


@st.composite
def tensors(draw: st.DrawFn) -> Tensor:
    name = draw(TEXT)
    if draw(st.booleans()):
        items = draw(st.lists(st.binary(max_size=12), max_size=5))
        shape = draw(st.sampled_from([(len(items),), (1, len(items)), (len(items), 1)]))
        return Tensor.from_strings(name, items, shape=shape)
    datatype = draw(st.sampled_from(sorted(DATATYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    size = int(np.prod(shape)) * DATATYPES[datatype].itemsize
    return Tensor(name, datatype, shape, draw(st.binary(min_size=size, max_size=size)))


PARAMETER = st.one_of(TEXT, LONG, st.floats(), st.booleans())
RESPONSES = st.builds(
    InferenceResponse,
    id=TEXT,
    model_name=TEXT,
    model_version=st.none() | TEXT,
    outputs=st.lists(tensors(), max_size=3),
    error=st.none() | st.builds(ErrorInfo, st.sampled_from(list(ErrorCode)) | TEXT, TEXT),
    timing=st.none() | st.builds(Timing, LONG, LONG, st.integers(-(2**31), 2**31 - 1)),
    parameters=st.none() | st.dictionaries(TEXT, PARAMETER, max_size=4),
)
STRINGS_REPLY = InferenceResponse(
    "s", "m", "2", [Tensor.from_strings("tags", ["B-PER", "", "日本"], shape=(1, 3))]
)
NUMBERS_REPLY = InferenceResponse(
    "n", "digits", "1", [Tensor.from_numpy("label", np.array([4], np.int64))], None,
    Timing(10, 20, 3), {"truncated": 1, "w": 0.5, "ok": True, "tag": "x"},
)  # fmt: skip
ERROR_REPLY = InferenceResponse("e", "nope", error=ErrorInfo("NOT_FOUND", "no model 'nope'"))


# Apache Avro's Python implementation


AVRO_SCHEMA = avro.schema.parse(RESPONSE_SCHEMA.read_text())
"""The only schema the ``avro`` package is given: the current one."""


def test_the_header_is_the_current_schemas_avro_fingerprint() -> None:
    """Replies start C3 01 + the current schema's CRC-64-AVRO (avro's and the spec's, not ours)."""
    canonical = AVRO_SCHEMA.canonical_form.encode()
    by_spec = SOE_MARKER + crc64_avro(canonical).to_bytes(8, "little")
    assert SOE_MARKER + AVRO_SCHEMA.fingerprint("CRC-64-AVRO") == by_spec
    for reply in (STRINGS_REPLY, NUMBERS_REPLY, ERROR_REPLY, InferenceResponse("", "")):
        assert encode_response(reply)[:10] == by_spec


@hypothesis.settings(max_examples=200, deadline=None)
@given(RESPONSES)
@example(STRINGS_REPLY)
@example(NUMBERS_REPLY)
@example(ERROR_REPLY)
def test_apache_avro_python_reads_any_reply_with_only_the_current_schema(
    reply: InferenceResponse,
) -> None:
    """The ``avro`` package decodes any reply, holding only inference_response.avsc, as written."""
    value = encode_response(reply)
    assert value[:10] == SOE_MARKER + AVRO_SCHEMA.fingerprint("CRC-64-AVRO")
    body = io.BytesIO(value[10:])
    record = avro.io.DatumReader(AVRO_SCHEMA).read(avro.io.BinaryDecoder(body))
    assert body.tell() == len(value) - 10, "the whole body is one reply"
    assert isinstance(record, dict)
    assert record_view(record) == expected_view(reply)


# Apache Avro's Java implementation, reading from the broker


@dataclass(frozen=True)
class JavaReader:
    """tests/clients/java/ReplyReader.java with its classpath (Maven-resolved, pinned)."""

    lib: Path

    async def read(self, bootstrap: str, topic: str, deadline: float = 120) -> JavaRun:
        """Every record of ``topic``, decoded by Java; fails the test if any did not decode."""
        cmd = [
            "java", "-XX:TieredStopAtLevel=1", "-Xmx256m",
            "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn",
            "-cp", f"{self.lib}/*", str(JAVA / "ReplyReader.java"),
            bootstrap, topic, str(RESPONSE_SCHEMA), str(deadline),
        ]  # fmt: skip
        began = time.monotonic()
        done = await asyncio.to_thread(
            subprocess.run, cmd, capture_output=True, text=True, timeout=deadline + 120
        )
        lines = [json.loads(line) for line in done.stdout.splitlines()]
        failed = [line for line in lines[1:] if "decode_error" in line]
        if done.returncode != 0 or failed:
            shown = "\n".join(json.dumps(line) for line in failed[:5])
            pytest.fail(
                f"the Java reader failed (exit {done.returncode}); {len(failed)} of "
                f"{len(lines) - 1} records did not decode with only the current schema:\n"
                f"{shown}\nstderr:\n{done.stderr[-3000:]}"
            )
        print(f"java reader: {len(lines) - 1} records in {time.monotonic() - began:.1f}s")
        return JavaRun(lines[0], lines[1:])


@dataclass(frozen=True)
class JavaRun:
    """What the Java reader printed: itself, then one decoded reply per record."""

    meta: dict[str, Any]
    records: list[dict[str, Any]]

    def views(self) -> dict[tuple[int, int], dict[str, Any]]:
        """Each record's reply view by (partition, offset)."""
        return {
            (r["partition"], r["offset"]): {
                k: v for k, v in r.items() if k not in ("partition", "offset")
            }
            for r in self.records
        }


@pytest.fixture(scope="session")
def java_reader() -> JavaReader:
    """The Java reader, its jars resolved by Maven (once per pom); no java or mvn: a failure."""
    missing = [tool for tool in ("java", "mvn") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not found: the Java interop tests need JDK 17+ "
                    "and Maven (as the local broker does)")  # fmt: skip
    lib = resolve_jars(
        JAVA / "pom.xml",
        JAVA / "lib",
        expect="avro-1.*.jar",
        what="Apache Avro and the Kafka client for tests/clients/java",
    )
    return JavaReader(lib)


def check_meta(run: JavaRun) -> None:
    """The reader is the pinned Apache Avro and expects the header the worker writes."""
    pinned = re.search(r"<avro\.version>(.+?)</avro\.version>", (JAVA / "pom.xml").read_text())
    assert pinned is not None
    assert run.meta["reader"] == "apache-avro-java"
    assert run.meta["avro_version"] == pinned.group(1)
    assert run.meta["header"] == encode_response(InferenceResponse("", ""))[:10].hex()


COLLECTING = hypothesis.settings(
    max_examples=300,
    deadline=None,
    derandomize=True,  # the same spread on every run
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow],
)
"""Hypothesis as a generator of a wide spread of replies, all checked by one Java run."""


@pytest.mark.kafka
async def test_java_decodes_any_reply_with_only_the_current_schema(
    settings: Settings, java_reader: JavaReader
) -> None:
    """Hundreds of generated replies (every datatype, BYTES, errors): Java reads each as written."""
    generated: list[InferenceResponse] = []

    @COLLECTING
    @given(RESPONSES)
    @example(STRINGS_REPLY)
    @example(NUMBERS_REPLY)
    @example(ERROR_REPLY)
    def collect(reply: InferenceResponse) -> None:
        assert expected_view(decode_response(encode_response(reply))) == expected_view(reply)
        generated.append(reply)

    collect()
    topic = settings.kafka.replies_topic
    await ensure_topics(settings.kafka, [topic])
    producer = make_producer(settings.kafka, linger_ms=5)
    await producer.start()
    try:
        sent = [await producer.send(topic, encode_response(reply)) for reply in generated]
        written = await asyncio.gather(*sent)
    finally:
        await producer.stop()
    expected = {
        (m.partition, m.offset): expected_view(r) for m, r in zip(written, generated, strict=True)
    }
    run = await java_reader.read(settings.kafka.bootstrap_servers, topic)
    check_meta(run)
    got = run.views()
    assert got.keys() == expected.keys(), "every record on the topic was read"
    for where, view in expected.items():
        assert got[where] == view, f"record {where}"
    datatypes = {t["datatype"] for view in expected.values() for t in view["outputs"]}
    assert datatypes == {*DATATYPES, BYTES}, "every datatype went through Java"


@pytest.mark.kafka
async def test_java_decodes_every_reply_of_a_real_worker(
    settings: Settings,
    text_repository: ModelRepository,
    testset: TestSet,
    java_reader: JavaReader,
) -> None:
    """Digits, MiniLM and error replies of a running worker: Java reads each as Python did."""
    settings = changed(settings, "models", repository=TEXT_MODELS)
    settings = changed(settings, "batching", max_batch_size=16, max_batch_delay_ms=50)
    pixels = testset[0]
    async with (
        running_worker(settings, text_repository),
        InferenceClient(settings.kafka) as client,
    ):
        calls = [client.infer("digits", {"pixels": pixels[i : i + 1]}) for i in range(24)]
        calls += [client.infer("digits", {"pixels": pixels[:5]}, version="2")]
        calls += [
            client.infer("minilm", {"text": [text]}, timeout=120)
            for text in ("Kafka absorbs the load.", "Workers scale out.", "word " * 600)
        ]
        calls += [
            client.infer("minilm", {"text": ["two", "strings"]}, timeout=120),
            client.infer("nope", {"pixels": pixels[:1]}),  # unknown model
            client.infer("digits", {"pixels": pixels[:1]}, version="99"),  # unknown version
            client.infer("digits", {"pixels": pixels[:1, :10]}),  # wrong shape
            client.infer("digits", {"pixels": pixels[:1].astype(np.int64)}),  # wrong datatype
            client.infer("minilm", {"text": np.zeros(2, np.float32)}),  # numbers for text
            client.infer("minilm", [Tensor.from_strings("text", [b"\xc3\x28"])]),  # not UTF-8
        ]
        replies = await asyncio.gather(*calls)
    # The worker has drained and stopped: the reply topic holds every reply it wrote.
    run = await java_reader.read(settings.kafka.bootstrap_servers, settings.kafka.replies_topic)
    check_meta(run)
    ours = {reply.id: expected_view(reply) for reply in replies}
    theirs = Counter(view["id"] for view in run.views().values())
    assert theirs == Counter(list(ours)), "one record per reply on the topic, each read by Java"
    for view in run.views().values():
        assert view == ours[view["id"]]
    codes = {reply.error.code for reply in replies if reply.error is not None}
    assert codes == {"NOT_FOUND", "INVALID_ARGUMENT"}
    assert sum(reply.error is None for reply in replies) == 29
    assert {t.datatype for r in replies for t in r.outputs} == {"FP32", "INT64"}
    assert any(reply.parameters for reply in replies), "a truncation note in parameters"
