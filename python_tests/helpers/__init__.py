"""Shared test helpers: inputs, oracles and runners (import as python_tests.helpers.NAME)."""
