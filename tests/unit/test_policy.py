"""Teacher policy: unregistered or non-permitted teachers are refused; the owner's override is recorded."""

import datetime as dt

import pytest

from services.teacher.policy import PolicyError, check

REGISTRY = """
teachers:
  ours:
    owner: lab
    license: apache-2.0
    distillation_permitted: true
  licensed-until-2026:
    owner: vendor
    license: commercial
    distillation_permitted: true
    expires: 2026-06-30
  no-distill:
    owner: vendor
    license: terms-forbid-distillation
    distillation_permitted: false
"""


@pytest.fixture
def registry(tmp_path):
    path = tmp_path / "teachers.yaml"
    path.write_text(REGISTRY)
    return path


def test_permitted_teacher_passes_with_its_terms(registry):
    policy = check("ours", registry)
    assert (policy.owner, policy.license, policy.distillation_permitted, policy.override) == (
        "lab", "apache-2.0", True, False)


@pytest.mark.parametrize("name,match", [
    ("unknown", "not registered"),
    ("no-distill", "does not permit distillation"),
    ("licensed-until-2026", "expired on 2026-06-30"),
])
def test_refused_teachers_name_the_reason(registry, name, match):
    with pytest.raises(PolicyError, match=match):
        check(name, registry, today=dt.date(2026, 11, 23))


def test_owner_override_is_recorded(registry):
    policy = check("no-distill", registry, override=True)
    assert policy.override is True and policy.distillation_permitted is False
    assert check("unknown", registry, override=True).override is True


def test_missing_registry_is_refused(tmp_path):
    with pytest.raises(PolicyError, match="not found"):
        check("ours", tmp_path / "nope.yaml")


def test_shipped_registry_permits_the_demo_teacher():
    from services.stack.models import TEACHER_NAME
    from services.stack.processes import REPO_ROOT

    assert check(TEACHER_NAME, REPO_ROOT / "deploy" / "teachers.yaml").distillation_permitted
