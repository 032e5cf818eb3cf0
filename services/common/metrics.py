"""Prometheus metrics shared by every service (prometheus-client), labelled by service."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RECORDS_IN = Counter("distill_records_in_total", "Records consumed", ["service", "topic"])
RECORDS_OUT = Counter("distill_records_out_total", "Records produced", ["service", "topic"])
DEAD_LETTERS = Counter("distill_dead_letters_total", "Records sent to the dead-letter topic", ["service", "reason"])
ERRORS = Counter("distill_errors_total", "Errors by kind", ["service", "kind"])
RETRIES = Counter("distill_retries_total", "Batches rewound and retried after a temporary failure", ["service"])
PROCESS_SECONDS = Histogram(
    "distill_process_seconds",
    "Time to process one polled batch",
    ["service"],
    buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
CONSUMER_LAG = Gauge("distill_consumer_lag", "Records behind the partition end", ["service", "topic", "partition"])
IN_FLIGHT = Gauge("distill_triton_in_flight", "Requests in flight to Triton", ["service"])
TRAIN_STEPS = Counter("distill_train_steps_total", "Optimizer steps", ["service"])
TRAIN_LOSS = Gauge("distill_train_loss", "Latest training loss by part", ["service", "part"])
SHARDS_WRITTEN = Counter("distill_shards_written_total", "Dataset shards written", ["service"])
ROWS_DEDUPED = Counter("distill_rows_deduplicated_total", "Rows skipped as duplicates", ["service"])


def serve_metrics(port: int) -> None:
    """Expose /metrics on `port` (0 disables it)."""
    if port:
        start_http_server(port)
