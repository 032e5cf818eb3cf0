"""Shared pytest setup: the real-server fixtures are plugins under tests/fixtures/. The servers a
session started are named, with their versions, at the end of the test log."""

from tests.fixtures import SERVERS

pytest_plugins = ["tests.fixtures.kafka", "tests.fixtures.models", "tests.fixtures.triton"]


def pytest_terminal_summary(terminalreporter):
    if SERVERS:
        terminalreporter.section("real servers")
        for line in SERVERS:
            terminalreporter.write_line(line)
