"""The command line's key flags read the environment and secrets files (containers)."""

from __future__ import annotations

import pytest
from loraplex.server.cli import build_parser, config_from_args


def _config(argv):
    return config_from_args(build_parser().parse_args(["serve", *argv]))


def test_keys_come_from_the_environment_or_secrets_files(tmp_path, monkeypatch):
    assert _config([]).admin_key is None
    (tmp_path / "admin").write_text("admin-from-file-123\n")
    monkeypatch.setenv("LORAPLEX_ADMIN_KEY_FILE", str(tmp_path / "admin"))
    monkeypatch.setenv("LORAPLEX_METRICS_KEY", "metrics-from-env")
    monkeypatch.setenv("LORAPLEX_TENANT_KEYS_FILE", "/etc/loraplex/tenants.json")
    config = _config([])
    assert (config.admin_key, config.metrics_key, config.api_key) == (
        "admin-from-file-123", "metrics-from-env", None)
    assert config.tenant_keys == "/etc/loraplex/tenants.json"
    assert _config(["--admin-key", "flag-wins-over-file"]).admin_key == "flag-wins-over-file"


def test_a_missing_secrets_file_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAPLEX_API_KEY_FILE", str(tmp_path / "nope"))
    with pytest.raises(SystemExit, match="LORAPLEX_API_KEY_FILE"):
        build_parser()
