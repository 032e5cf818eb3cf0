"""`distill dlq`: list dead letters (reason, stage, origin, a preview of the original bytes) and,
with --resubmit, send the original records back to the topic they came from, after a fix.

Dead letters carry the original key, value and headers, plus `dlq-*` headers written by the stage
that gave up on them (services/common/loop.py: dead_letter_headers).
"""

from __future__ import annotations

import json
import sys
import uuid

from services.common.config import DEAD_LETTERS, CommonSettings
from services.common.kafka import make_consumer, make_producer


def read_dead_letters(settings: CommonSettings, limit: int = 1000, idle_s: float = 3.0) -> list:
    consumer = make_consumer(settings, f"distill-dlq-{uuid.uuid4().hex[:8]}", "distill-dlq")
    consumer.subscribe([settings.topic(DEAD_LETTERS)])
    records: list = []
    try:
        idle = 0.0
        while idle < idle_s and len(records) < limit:
            polled = consumer.poll(timeout_ms=500)
            batch = [r for rs in polled.values() for r in rs]
            idle = 0.0 if batch else idle + 0.5
            records.extend(batch)
    finally:
        consumer.close()
    return records[:limit]


def describe(record) -> dict:
    headers = {k: v.decode("utf-8", "replace") for k, v in (record.headers or [])}
    value = record.value or b""
    return {
        "offset": record.offset,
        "key": record.key.decode("utf-8", "replace") if record.key else None,
        "reason": headers.get("dlq-reason"),
        "detail": headers.get("dlq-detail"),
        "stage": headers.get("dlq-stage"),
        "source": f"{headers.get('dlq-source-topic')}:{headers.get('dlq-source-partition')}"
                  f"@{headers.get('dlq-source-offset')}",
        "bytes": len(value),
        "preview": value[:120].decode("utf-8", "replace"),
    }


def resubmit(settings: CommonSettings, records: list) -> int:
    producer = make_producer(settings, "distill-dlq-resubmit")
    futures = []
    try:
        for record in records:
            headers = [(k, v) for k, v in (record.headers or []) if not k.startswith("dlq-")]
            topic = dict(record.headers or []).get("dlq-source-topic", b"").decode()
            if not topic:
                continue
            futures.append(producer.send(topic, key=record.key, value=record.value, headers=headers))
        producer.flush()
        for future in futures:
            future.get(timeout=0)
    finally:
        producer.close()
    return len(futures)


def main(args, settings: CommonSettings) -> int:
    records = read_dead_letters(settings, limit=args.limit)
    if args.reason:
        records = [r for r in records if dict(r.headers or []).get("dlq-reason", b"").decode() == args.reason]
    for record in records:
        sys.stdout.write(json.dumps(describe(record)) + "\n")
    if args.resubmit:
        sent = resubmit(settings, records)
        sys.stderr.write(f"re-submitted {sent} dead letters to their source topics\n")
    return 0
