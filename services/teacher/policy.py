"""Teacher policy: a registry (YAML) of the teachers this deployment may distil from.

    teachers:
      distillery-tiny-teacher:           # the model_name the teacher reports
        owner: distillery
        license: apache-2.0
        distillation_permitted: true
        allowed_student_uses: [research, commercial]   # optional
        expires: 2027-12-31                            # optional, ISO date

Teacher-inference checks the teacher it is about to serve at start-up and refuses (exits with a
clear error) when it is not registered, not permitted, or past its expiry. The owner of a teacher may
set `DISTILL_TEACHER_POLICY_OVERRIDE=true`; the override is recorded in every row's lineage.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class PolicyError(RuntimeError):
    """This teacher may not be distilled from under the registry."""


@dataclass(frozen=True)
class TeacherPolicy:
    model_name: str
    owner: str
    license: str
    distillation_permitted: bool
    allowed_student_uses: tuple[str, ...] = ()
    expires: dt.date | None = None
    override: bool = False
    notes: list[str] = field(default_factory=list)


def load_registry(path: Path) -> dict[str, dict]:
    if not path.exists():
        raise PolicyError(f"teacher registry {path} not found (DISTILL_TEACHER_REGISTRY); every teacher must be registered")
    data = yaml.safe_load(path.read_text()) or {}
    teachers = data.get("teachers")
    if not isinstance(teachers, dict):
        raise PolicyError(f"teacher registry {path} has no 'teachers' mapping")
    return teachers


def check(model_name: str, registry_path: Path, override: bool = False, today: dt.date | None = None) -> TeacherPolicy:
    """The policy for `model_name`; raises PolicyError unless it permits distillation (or the
    owner's override is set, which is then recorded)."""
    today = today or dt.date.today()
    try:
        teachers = load_registry(registry_path)
    except PolicyError:
        if override:
            return TeacherPolicy(model_name, "", "", False, override=True, notes=["no registry; owner override"])
        raise
    entry = teachers.get(model_name)
    if entry is None:
        if override:
            return TeacherPolicy(model_name, "", "", False, override=True, notes=["unregistered; owner override"])
        raise PolicyError(
            f"teacher {model_name!r} is not registered in {registry_path}; add it with its owner, licence and "
            f"distillation_permitted, or set DISTILL_TEACHER_POLICY_OVERRIDE=true if you own it"
        )
    expires = entry.get("expires")
    if isinstance(expires, str):
        expires = dt.date.fromisoformat(expires)
    policy = TeacherPolicy(
        model_name=model_name,
        owner=str(entry.get("owner", "")),
        license=str(entry.get("license", "")),
        distillation_permitted=bool(entry.get("distillation_permitted", False)),
        allowed_student_uses=tuple(entry.get("allowed_student_uses") or ()),
        expires=expires,
        override=override,
    )
    problems = []
    if not policy.distillation_permitted:
        problems.append(f"its licence ({policy.license or 'unknown'}) does not permit distillation")
    if expires is not None and today > expires:
        problems.append(f"its permission expired on {expires.isoformat()}")
    if problems and not override:
        raise PolicyError(f"teacher {model_name!r} refused: " + "; ".join(problems)
                          + " (the owner may set DISTILL_TEACHER_POLICY_OVERRIDE=true)")
    return policy
