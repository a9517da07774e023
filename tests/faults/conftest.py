"""Fixtures of the fault suite: the store's data-center key pair."""

from tests.store.conftest import dc_keys  # noqa: F401  (the one fixture, shared)
