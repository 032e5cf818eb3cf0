"""`distill report`: a training-data summary of a checkpoint (or of a whole data dir) in Markdown
and JSON, built only from recorded lineage: the checkpoint's lineage.json (shards with sha256),
the shards' own rows (teacher identity and licence, prompt source and licence, times, tokens).
`--verify` recomputes every shard's sha256 and fails on any mismatch.

The public summary the EU AI Act asks of providers of general-purpose models starts from exactly
these facts: which teachers (and under which terms) produced the data, where the prompts came from,
how much, and when.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from services.common.files import same_digest, sha256_file

REPORT_VERSION = 1
COLUMNS = ["prompt_id", "teacher_model", "teacher_revision", "teacher_version", "teacher_license", "teacher_owner",
           "distillation_permitted", "policy_override", "triton_version", "teacher_tokenizer_hash", "source",
           "prompt_license", "prompt_token_ids", "completion_token_ids", "created_at", "written_at"]


class VerifyError(RuntimeError):
    pass


def _path(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


def shards_of(target: Path) -> tuple[list[dict], dict | None]:
    """(shards with shard_id/uri/sha256, the checkpoint lineage or None for a data dir)."""
    if (target / "lineage.json").exists():
        lineage = json.loads((target / "lineage.json").read_text())
        return list(lineage.get("shards", [])), lineage
    shards = []
    for manifest in sorted(target.glob("datasets/**/*.manifest.json")):
        body = json.loads(manifest.read_text())
        shards.append({"shard_id": body.get("shard_id"), "uri": body.get("uri"), "sha256": body.get("sha256"),
                       "record_count": body.get("record_count")})
    return shards, None


def build_report(target: Path, verify: bool = False, dead_letters: dict[str, int] | None = None) -> dict:
    """The summary of `target` (a checkpoint folder, or a data dir). `dead_letters` (reason ->
    count, read from distill.dead-letters) is added when the caller could reach the broker."""
    shards, lineage = shards_of(target)
    teachers: dict[tuple, dict] = {}
    sources: Counter = Counter()
    source_licenses: dict[str, set] = {}
    rows = prompt_tokens = completion_tokens = 0
    first = last = None
    mismatches = []
    shard_rows = []
    for shard in shards:
        path = _path(shard["uri"])
        entry = {"shard_id": shard["shard_id"], "sha256": shard.get("sha256"), "uri": shard["uri"]}
        if verify:
            actual = sha256_file(path) if path.exists() else "missing"
            entry["verified"] = same_digest(actual, str(shard.get("sha256", "")))
            if not entry["verified"]:
                mismatches.append(f"{shard['shard_id']}: recorded {shard.get('sha256')}, found {actual}")
        shard_rows.append(entry)
        if not path.exists() or entry.get("verified") is False:
            continue  # a shard that is not what the lineage recorded is not summarised
        try:
            table = pq.read_table(path, columns=COLUMNS)
        except (OSError, ValueError) as exc:
            mismatches.append(f"{shard['shard_id']}: unreadable: {exc}")
            continue
        rows += table.num_rows
        entry["rows"] = table.num_rows
        prompt_tokens += int(pc.sum(pc.list_value_length(table.column("prompt_token_ids"))).as_py() or 0)
        completion_tokens += int(pc.sum(pc.list_value_length(table.column("completion_token_ids"))).as_py() or 0)
        for row in table.select(["teacher_model", "teacher_revision", "teacher_version", "teacher_license",
                                 "teacher_owner", "distillation_permitted", "policy_override", "triton_version",
                                 "teacher_tokenizer_hash"]).to_pylist():
            key = (row["teacher_model"], row["teacher_revision"])
            t = teachers.setdefault(key, {**row, "rows": 0, "triton_versions": set()})
            t["rows"] += 1
            t["triton_versions"].add(row["triton_version"])
        for source, license_ in zip(table.column("source").to_pylist(), table.column("prompt_license").to_pylist()):
            source = source or "(unspecified)"
            sources[source] += 1
            source_licenses.setdefault(source, set()).add(license_ or "(unspecified)")
        lo, hi = pc.min(table.column("created_at")).as_py(), pc.max(table.column("written_at")).as_py()
        first = lo if first is None or (lo and lo < first) else first
        last = hi if last is None or (hi and hi > last) else last
    report = {
        "report_version": REPORT_VERSION,
        "generated_at": datetime.now(timezone.utc).isoformat(),
        "subject": str(target),
        "checkpoint": None if lineage is None else {
            "run_id": lineage.get("run_id"), "step": lineage.get("step"), "samples": lineage.get("samples"),
            "student": lineage.get("student"), "metrics": lineage.get("metrics"),
        },
        "teachers": [
            {**{k: v for k, v in t.items() if k != "triton_versions"}, "triton_versions": sorted(t["triton_versions"])}
            for t in teachers.values()
        ],
        "prompt_sources": [
            {"source": s, "rows": n, "licenses": sorted(source_licenses[s])} for s, n in sources.most_common()
        ],
        "rows": rows,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "time_span": {"first_prompt_created": first.isoformat() if first else None,
                      "last_row_written": last.isoformat() if last else None},
        "shards": shard_rows,
        "verified": (not mismatches) if verify else None,
        "mismatches": mismatches,
        "dead_letters_by_reason": dead_letters,
    }
    return report


def to_markdown(report: dict) -> str:
    lines = ["# Training-data summary", "", f"Subject: `{report['subject']}`  ", f"Generated: {report['generated_at']}", ""]
    if report["checkpoint"]:
        c = report["checkpoint"]
        lines += [f"Checkpoint: run `{c['run_id']}`, step {c['step']}, {c['samples']} samples", ""]
    lines += ["## Teachers", "", "| model | revision | licence | owner | distillation permitted | override | rows | Triton |",
              "|---|---|---|---|---|---|---|---|"]
    for t in report["teachers"]:
        lines.append(f"| {t['teacher_model']} | `{t['teacher_revision']}` | {t['teacher_license'] or '-'} | "
                     f"{t['teacher_owner'] or '-'} | {t['distillation_permitted']} | {t['policy_override']} | "
                     f"{t['rows']} | {', '.join(t['triton_versions'])} |")
    lines += ["", "## Prompt sources", "", "| source | rows | licences |", "|---|---|---|"]
    for s in report["prompt_sources"]:
        lines.append(f"| {s['source']} | {s['rows']} | {', '.join(s['licenses'])} |")
    span = report["time_span"]
    lines += ["", "## Volume", "", f"- rows: {report['rows']}", f"- prompt tokens: {report['prompt_tokens']}",
              f"- completion tokens: {report['completion_tokens']}",
              f"- time span: {span['first_prompt_created']} to {span['last_row_written']}", "",
              "## Shards", "", "| shard | rows | sha256 |" + (" verified |" if report["verified"] is not None else ""),
              "|---|---|---|" + ("---|" if report["verified"] is not None else "")]
    for s in report["shards"]:
        lines.append(f"| {s['shard_id']} | {s.get('rows', '?')} | `{s['sha256']}` |"
                     + (f" {s.get('verified')} |" if report["verified"] is not None else ""))
    lines += ["", "## Dead letters by reason", ""]
    if report.get("dead_letters_by_reason") is None:
        lines.append("Not included: no broker was reachable when this report was written (`distill dlq` lists them).")
    else:
        lines += [f"- {reason}: {count}" for reason, count in sorted(report["dead_letters_by_reason"].items())] or [
            "- none"]
    if report["mismatches"]:
        lines += ["", "## Verification FAILED", ""] + [f"- {m}" for m in report["mismatches"]]
    return "\n".join(lines) + "\n"


def write_report(target: Path, out: Path | None = None, verify: bool = False,
                 dead_letters: dict[str, int] | None = None) -> Path:
    report = build_report(target, verify=verify, dead_letters=dead_letters)
    out = out or (target if (target / "lineage.json").exists() else target / "reports")
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "report.md").write_text(to_markdown(report))
    if verify and report["mismatches"]:
        raise VerifyError("; ".join(report["mismatches"]))
    return out / "report.md"


def dead_letter_counts(settings) -> dict[str, int] | None:
    """Dead letters by reason from the broker, or None when it cannot be reached."""
    from collections import Counter

    from kafka.errors import KafkaError

    from services.stack.dlq import read_dead_letters

    try:
        records = read_dead_letters(settings, limit=1_000_000, idle_s=2.0)
    except (KafkaError, OSError, ValueError):
        return None
    return dict(Counter(dict(r.headers or []).get("dlq-reason", b"?").decode() for r in records))


def main(args, settings=None) -> int:
    target = Path(args.checkpoint) if args.checkpoint else Path(args.data_dir or ".distill")
    dead_letters = dead_letter_counts(settings) if settings is not None else None
    try:
        path = write_report(target, Path(args.out) if args.out else None, verify=args.verify,
                            dead_letters=dead_letters)
    except VerifyError as exc:
        sys.stderr.write(f"distill report: verification failed: {exc}\n")
        return 1
    sys.stdout.write(f"{path}\n")
    return 0
