"""The `rekam` CLI against a real `rekamd --sim`: the console tests' daemon fixtures, reused."""

from tests.console.conftest import daemon, make_daemon  # noqa: F401  (fixtures)
