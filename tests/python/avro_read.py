#!/usr/bin/env python3
"""Independent cross-check of ketenbus's Kafka topics: reads a topic with confluent-kafka
(librdkafka through Python, not ketenbus's rdkafka), decodes each value with fastavro and a
published .avsc file, and prints one JSON object per record.

Values must use Avro single-object encoding: C3 01, the schema's 8-byte little-endian
CRC-64-AVRO (Rabin) fingerprint of its parsing canonical form, then the binary datum. The
fingerprint is checked against the one fastavro computes from the .avsc.

    avro_read.py --bootstrap 127.0.0.1:19092 --topic ketenbus.raw \
        --schema schemas/avro/envelope.avsc --count 1 --timeout 30

Each output line: {"topic", "partition", "offset", "timestamp_ms", "key" (UTF-8, or null),
"key_hex", "value"}. In "value", Avro bytes/fixed are base64 strings and timestamp-millis /
timestamp-micros are the raw epoch numbers; everything else is as fastavro decodes it.

Reads every partition from the beginning without joining a consumer group (nothing is
committed). Stops after --count records (0: read up to the end of every partition).
Exit status: 0 when --count records were read and decoded; 1 when fewer arrived within
--timeout; 2 when a value is not single-object encoded with this schema or does not decode;
3 when the topic does not exist or the broker cannot be reached.
"""

import argparse
import base64
import datetime
import decimal
import io
import json
import sys
import time
import uuid

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from fastavro import schemaless_reader
from fastavro.schema import fingerprint, parse_schema, to_parsing_canonical_form

MARKER = b"\xc3\x01"
HEADER_LEN = 10


def load_schema(path):
    with open(path, encoding="utf-8") as f:
        parsed = parse_schema(json.load(f))
    canonical = to_parsing_canonical_form(parsed)
    # fastavro's hex is already the little-endian byte order single-object encoding uses.
    return parsed, bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO"))


def to_json(value):
    """JSON `default` hook for what fastavro returns beyond JSON's types."""
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.timezone.utc)
        delta = value - datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
        if delta.microseconds % 1000:
            return delta // datetime.timedelta(microseconds=1)
        return delta // datetime.timedelta(milliseconds=1)
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (decimal.Decimal, uuid.UUID)):
        return str(value)
    raise TypeError(f"cannot print {type(value).__name__} as JSON")


def decode(value, schema, expected_fp):
    if value is None or len(value) < HEADER_LEN:
        raise ValueError(f"value too short for single-object encoding ({0 if value is None else len(value)} bytes)")
    if value[:2] != MARKER:
        raise ValueError(f"missing single-object marker C3 01 (found {value[:2].hex()})")
    found_fp = value[2:HEADER_LEN]
    if found_fp != expected_fp:
        raise ValueError(f"schema fingerprint {found_fp.hex()} is not {expected_fp.hex()} of the given schema")
    body = io.BytesIO(value[HEADER_LEN:])
    datum = schemaless_reader(body, schema)
    rest = len(value) - HEADER_LEN - body.tell()
    if rest:
        raise ValueError(f"{rest} bytes left after the datum")
    return datum


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bootstrap", required=True, help="HOST:PORT of the Kafka-protocol broker")
    ap.add_argument("--topic", required=True)
    ap.add_argument("--schema", required=True, help=".avsc file the values are written with")
    ap.add_argument("--count", type=int, default=1, help="records to read (0: all there are)")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for them")
    args = ap.parse_args()

    schema, expected_fp = load_schema(args.schema)
    deadline = time.monotonic() + args.timeout
    consumer = Consumer(
        {
            "bootstrap.servers": args.bootstrap,
            # Needed by librdkafka for assign(); never joins, never commits.
            "group.id": "ketenbus-avro-read",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "allow.auto.create.topics": False,
        }
    )
    try:
        try:
            metadata = consumer.list_topics(args.topic, timeout=max(1.0, args.timeout))
        except KafkaException as e:
            print(f"avro_read: cannot reach {args.bootstrap}: {e}", file=sys.stderr)
            return 3
        topic = metadata.topics.get(args.topic)
        if topic is None or topic.error is not None or not topic.partitions:
            err = topic.error if topic is not None else "absent"
            print(f"avro_read: topic {args.topic} not found ({err})", file=sys.stderr)
            return 3
        partitions = sorted(topic.partitions)
        consumer.assign([TopicPartition(args.topic, p, OFFSET_BEGINNING) for p in partitions])

        at_end = set()
        read = 0
        while args.count == 0 or read < args.count:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            msg = consumer.poll(min(left, 0.5))
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    at_end.add(msg.partition())
                    if args.count == 0 and at_end >= set(partitions):
                        break
                    continue
                print(f"avro_read: {msg.error()}", file=sys.stderr)
                if not msg.error().retriable():
                    return 3
                continue
            at_end.discard(msg.partition())
            try:
                datum = decode(msg.value(), schema, expected_fp)
            except Exception as e:  # noqa: BLE001 - any decode failure is the finding
                print(
                    f"avro_read: {args.topic}/{msg.partition()}@{msg.offset()}: {e}",
                    file=sys.stderr,
                )
                return 2
            key = msg.key() or b""
            try:
                key_text = key.decode("utf-8")
            except UnicodeDecodeError:
                key_text = None
            _, ts = msg.timestamp()
            line = {
                "topic": msg.topic(),
                "partition": msg.partition(),
                "offset": msg.offset(),
                "timestamp_ms": ts,
                "key": key_text,
                "key_hex": key.hex(),
                "value": datum,
            }
            print(json.dumps(line, default=to_json, ensure_ascii=False), flush=True)
            read += 1
    finally:
        consumer.close()

    if args.count and read < args.count:
        print(
            f"avro_read: {read} of {args.count} records from {args.topic} within {args.timeout} s",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
