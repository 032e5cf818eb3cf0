"""Shared pytest setup: the real-server fixtures are plugins under tests/fixtures/."""

pytest_plugins = ["tests.fixtures.kafka", "tests.fixtures.models", "tests.fixtures.triton"]
