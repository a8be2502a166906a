"""fleet.toml's `[registry] url`: empty is the SQLite file; a PostgreSQL URL is taken with the rabbitmq broker and
refused with Mosquitto (its plugin reads the file) in one line, the password never repeated; anything else is
refused."""

from __future__ import annotations

import pytest

from hub.config import ConfigError, HubConfig, load_config
from hub.registry.sql import PG_NEEDS_RABBITMQ, safe_url


def _hub(tmp_path, url: str | None, broker: str = "mosquitto"):
    cfg = HubConfig(root=tmp_path, fleet="acme", broker_kind=broker,
                    rabbitmq_management=["http://127.0.0.1:15672"] if broker == "rabbitmq" else [])
    cfg.save()
    if url is not None:
        text = cfg.toml_path.read_text().replace('[registry]\n', '[registry-old]\n')
        cfg.toml_path.write_text(text + f'\n[registry]\nurl = "{url}"\n')
    return tmp_path


def test_default_is_the_sqlite_file(tmp_path) -> None:
    cfg = load_config(_hub(tmp_path, None))
    assert cfg.registry_url == "" and cfg.registry_path == tmp_path / "registry.sqlite3"
    assert '[registry]\n' in cfg.to_toml() and 'url = ""' in cfg.to_toml()


def test_postgresql_with_mosquitto_refused(tmp_path) -> None:
    root = _hub(tmp_path, "postgresql+psycopg://hub:s3cret-pw@db.example.com:5432/fleet")
    with pytest.raises(ConfigError) as exc:
        load_config(root)
    message = str(exc.value)
    assert "\n" not in message and "s3cret-pw" not in message
    assert PG_NEEDS_RABBITMQ in message


def test_postgresql_with_rabbitmq_taken(tmp_path) -> None:
    url = "postgresql+psycopg://hub@db.example.com:5432/fleet?passfile=/etc/tessera/pgpass"
    cfg = load_config(_hub(tmp_path, url, broker="rabbitmq"))
    assert cfg.registry_url == url and cfg.registry_target == url
    assert load_config(_hub(tmp_path, None)).registry_target == tmp_path / "registry.sqlite3"


def test_bad_postgresql_url_refused_without_echo(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not a valid PostgreSQL URL") as exc:
        load_config(_hub(tmp_path, "postgresql+psycopg://hub:s3cret@db:notaport/x", broker="rabbitmq"))
    assert "s3cret" not in str(exc.value)


@pytest.mark.parametrize("url", ["mysql://x@y/z", "registry.sqlite3", "sqlite:///elsewhere.db"])
def test_other_urls_refused(tmp_path, url: str) -> None:
    with pytest.raises(ConfigError, match=r"\[registry\] url must be empty .* or postgresql\+psycopg://"):
        load_config(_hub(tmp_path, url))


def test_safe_url_never_echoes_garbage() -> None:
    assert safe_url("postgresql://u:pw@h/db") == "postgresql://u:***@h/db"
