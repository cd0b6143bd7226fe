"""Configuration: layers, the platform's env names, strictness, secrets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from dlq_worker import config as config_mod
from dlq_worker.cli import cli, main
from dlq_worker.config import Config, describe
from dlq_worker.errors import ConfigError


def load(env: dict[str, str] | None = None, path: Path | None = None,
         platform_path: Path | None = None, **overrides: Any) -> Config:
    return config_mod.load(path, env=env or {}, overrides=overrides or None,
                           platform_path=platform_path)


def test_defaults_follow_the_design() -> None:
    cfg = load()
    assert cfg.redis.db == 1  # never DB 0: it belongs to another service's cache
    assert cfg.database.name == "action_history" and cfg.database.user == "slm_user"
    assert cfg.streams.prefix == "audit:dlq:"
    assert dict(cfg.streams.routes) == {"events": "audit_events",
                                        "notifications": "notification_audit",
                                        "notification": "notification_audit"}
    assert cfg.streams.max_length == 10000 and cfg.streams.ttl == 168 * 3600


def test_platform_env_names_work_without_a_file() -> None:
    cfg = load({"REDIS_ADDR": "redis.svc:6380", "REDIS_DB": "3", "REDIS_PASSWORD": "rp",
                "DB_HOST": "pg.svc", "DB_PORT": "5433", "DB_NAME": "x", "DB_USER": "u",
                "DB_PASSWORD": "dp", "DB_SSLMODE": "require"})
    assert (cfg.redis.host, cfg.redis.port, cfg.redis.db) == ("redis.svc", 6380, 3)
    assert cfg.redis.password == "rp" and cfg.database.password == "dp"
    assert (cfg.database.host, cfg.database.port, cfg.database.name) == ("pg.svc", 5433, "x")
    assert cfg.database.sslmode == "require"


def test_layers_file_then_env_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "w.yaml"
    path.write_text("worker:\n  batch_size: 10\n  linger: 100ms\nhttp:\n  port: 9000\n")
    cfg = load({"DLQ_WORKER_WORKER_BATCH_SIZE": "20"}, path, http={"port": 9100})
    assert cfg.worker.batch_size == 20  # env beats file
    assert cfg.worker.linger == pytest.approx(0.1)  # file beats default
    assert cfg.http.port == 9100  # flag beats file


def test_password_file(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    cfg = load({"DB_PASSWORD_FILE": str(secret)})
    assert cfg.database.password == "from-file"
    assert "from-file" not in repr(cfg)


def test_rediss_url_turns_on_tls() -> None:
    cfg = load({"REDIS_ADDR": "rediss://redis.svc:6380"})
    assert cfg.redis.use_tls and cfg.redis.port == 6380


@pytest.mark.parametrize(("yaml_text", "env", "fragment"), [
    ("worker:\n  batch_sise: 3\n", {}, "unknown key 'worker.batch_sise' (did you mean "
                                       "'worker.batch_size'?)"),
    ("wrker:\n  batch_size: 3\n", {}, "unknown section 'wrker'"),
    ("worker:\n  batch_size: lots\n", {}, "'worker.batch_size' expects an integer"),
    ("worker:\n  linger: soon\n", {}, "'worker.linger' expects a duration"),
    ("worker:\n  batch_size: 0\n", {}, "'worker.batch_size' expects between 1 and 10000"),
    ("database:\n  password: hunter2\n", {}, "'database.password' is a secret"),
    ("database:\n  sslmode: maybe\n", {}, "'database.sslmode' expects one of"),
    ("streams:\n  routes: {events: audit_event}\n", {}, "'streams.routes.events' expects a table"),
    ("streams:\n  dead_letter_prefix: 'audit:dlq:dead:'\n", {}, "outside streams.prefix"),
    ("", {"REDIS_ADDR": "redis.svc"}, "'redis.addr' expects host:port"),
    ("", {"REDIS_ADDR": "redis://u:p@redis.svc:6379"}, "credentials in the address"),
    ("", {"REDIS_ADDR": "dlq:s3cr3t-pw@redis.svc:6379"}, "credentials in the address"),
    ("", {"REDIS_ADDR": "rediss://:s3cr3t-pw@redis.svc:notaport"}, "credentials in the address"),
    ("database:\n  partition_months_back: -1\n", {}, "'database.partition_months_back'"),
    ("worker:\n  batch_max_bytes: 10\n", {}, "'worker.batch_max_bytes' expects at least"),
    ("worker:\n  systemic_after: 1\n", {}, "'worker.systemic_after' expects at least 2"),
    ("", {"REDIS_DB": "one"}, "'redis.db' expects an integer"),
    ("", {"DLQ_WORKER_WORKER_BACH_SIZE": "3"}, "unknown setting DLQ_WORKER_WORKER_BACH_SIZE"),
    ("- a\n- b\n", {}, "the top level must be a mapping"),
    ("worker: [\n", {}, "not valid YAML at line"),
])
def test_bad_config_names_the_key(tmp_path: Path, yaml_text: str, env: dict[str, str],
                                  fragment: str) -> None:
    path = tmp_path / "w.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load(env, path)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)
    assert "s3cr3t" not in str(err.value)


def test_kubernetes_service_env_vars_are_not_settings() -> None:
    # A Service named dlq-worker makes Kubernetes inject these into the pod.
    cfg = load({"DLQ_WORKER_SERVICE_HOST": "10.0.0.1", "DLQ_WORKER_PORT_8080_TCP": "tcp://x"})
    assert cfg.http.port == 8080


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load(path=Path("/nonexistent/worker.yaml"))


def test_example_worker_yaml_is_valid_and_complete() -> None:
    path = Path(__file__).parents[2] / "worker.yaml"
    cfg = load(path=path)
    text = path.read_text()
    for section, values in config_mod.describe(cfg).items():
        for key in values:
            if key != "password":
                assert f"{key}:" in text, f"worker.yaml does not document {section}.{key}"


def test_check_config_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DB_PASSWORD", "pw-never-shown")
    result = CliRunner().invoke(cli, ["check-config", "--show", "--redis-db", "4"])
    assert result.exit_code == 0, result.output
    assert '"db": 4' in result.output and "pw-never-shown" not in result.output

    bad = tmp_path / "bad.yaml"
    bad.write_text("http:\n  prot: 1\n")
    monkeypatch.setattr("sys.argv", ["dlq-worker", "check-config", "-c", str(bad)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 3
    assert "unknown key 'http.prot'" in capsys.readouterr().err


@pytest.mark.parametrize(("yaml_text", "env", "flags", "expected"), [
    ("worker:\n  batch_size: -3\n", {}, {},
     "{path}: 'worker.batch_size' expects between 1 and 10000, got -3"),
    ("", {"DLQ_WORKER_WORKER_BATCH_SIZE": "20000"}, {},
     "environment: 'worker.batch_size' expects between 1 and 10000, got 20000"),
    ("", {}, {"http": {"port": 70000}},
     "command line: 'http.port' expects a port between 0 and 65535, got 70000"),
    ("worker:\n  claim_idle: 10ms\n", {}, {},
     "{path}: 'worker.claim_idle' expects at least 1s, got 0.01s"),
    ("worker:\n  backoff_initial: 1s\n  backoff_max: 500ms\n", {}, {},
     "{path}: 'worker.backoff_max' expects >= backoff_initial > 0, got 0.5s"),
])
def test_range_errors_name_the_source_and_the_value(
        tmp_path: Path, yaml_text: str, env: dict[str, str], flags: dict[str, Any],
        expected: str) -> None:
    path = tmp_path / "worker.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load(env, path, **flags)
    assert str(err.value) == expected.format(path=path)


def test_a_secret_in_a_range_error_is_never_shown() -> None:
    with pytest.raises(ConfigError) as err:
        load({"DLQ_WORKER_DATABASE_HASH_CHAIN": "hmac"})
    assert "'database.hash_chain_key'" in str(err.value) and "got" not in str(err.value)


DATA = Path(__file__).parents[1] / "data"
PLATFORM_EXAMPLE = DATA / "datastorage-config-design.yaml"


def platform_files(tmp_path: Path, **secrets: dict[str, str]) -> Path:
    """The platform's file in today's shape, its secrets files under tmp_path (where the
    platform mounts them under /etc/datastorage/secrets/)."""
    files = {"db-secrets.yaml": {"username": "audit_writer", "password": "pg-pass"},
             "valkey-secrets.yaml": {"password": "valkey-pass"},
             "audit-hmac-key.yaml": {"hmacKey": "the-hmac-key"}}
    files.update(secrets)
    for name, doc in files.items():
        (tmp_path / name).write_text(yaml.safe_dump(doc))
    text = (DATA / "datastorage-config.yaml").read_text()
    path = tmp_path / "config.yaml"
    path.write_text(text.replace("/etc/datastorage/secrets/", f"{tmp_path}/"))
    return path


def test_the_platforms_config_file_in_todays_shape_is_read_as_it_is(tmp_path: Path) -> None:
    # Given the platform's own ConfigMap file as the service has it today, and its secrets
    cfg = load({}, platform_path=platform_files(tmp_path))
    # Then the worker takes what it needs from them, and nothing else
    assert (cfg.database.host, cfg.database.port, cfg.database.name, cfg.database.sslmode) \
        == ("postgresql.kubernaut-system.svc.cluster.local", 5432, "action_history", "require")
    assert (cfg.database.user, cfg.database.password) == ("audit_writer", "pg-pass")
    assert (cfg.redis.host, cfg.redis.port, cfg.redis.password) == (
        "valkey.kubernaut-system.svc.cluster.local", 6380, "valkey-pass")
    assert cfg.redis.tls and cfg.redis.tls_ca_file == "/etc/datastorage/tls/ca.crt"
    assert cfg.streams.max_length == 10000
    assert cfg.database.hash_chain_key == "the-hmac-key"
    # and drains DB 0, where the platform writes its DLQ whatever its ConfigMap says
    assert cfg.redis.db == 0
    # and no secret shows in the effective configuration
    shown = json.dumps(describe(cfg))
    assert not any(s in shown for s in ("pg-pass", "valkey-pass", "the-hmac-key"))


def test_a_missing_secrets_file_or_key_is_named(tmp_path: Path) -> None:
    path = platform_files(tmp_path, **{"valkey-secrets.yaml": {"pass": "x"}})
    with pytest.raises(ConfigError) as err:
        load({}, platform_path=path)
    assert "'redis.secretsFile'" in str(err.value) and "no key 'password'" in str(err.value)
    (tmp_path / "db-secrets.yaml").unlink()
    with pytest.raises(ConfigError) as err:
        load({}, platform_path=path)
    assert "db-secrets.yaml" in str(err.value) and "\n" not in str(err.value)


def test_the_platforms_config_file_in_the_design_shape_is_read_too() -> None:
    # Given the platform's file in the design document's shape
    cfg = load({}, platform_path=PLATFORM_EXAMPLE)
    assert (cfg.database.host, cfg.database.port) == (
        "postgresql.kubernaut-system.svc.cluster.local", 5432)
    assert (cfg.database.name, cfg.database.user, cfg.database.sslmode) == (
        "action_history", "slm_user", "require")
    # its redis.db is ignored by the service, and so by the worker: DB 0
    assert (cfg.redis.host, cfg.redis.port, cfg.redis.db) == (
        "redis.kubernaut-system.svc.cluster.local", 6379, 0)
    assert (cfg.streams.prefix, cfg.streams.max_length) == ("audit:dlq:", 10000)
    assert cfg.database.password == ""


def test_the_platform_config_is_the_lowest_layer(tmp_path: Path) -> None:
    own = tmp_path / "worker.yaml"
    own.write_text("database:\n  host: db.override\n")
    cfg = load({"REDIS_DB": "2", "DLQ_WORKER_PLATFORM_CONFIG": str(PLATFORM_EXAMPLE)}, own)
    assert cfg.database.host == "db.override"  # worker.yaml beats the platform's file
    assert cfg.redis.db == 2  # the environment too
    assert cfg.database.user == "slm_user"  # the rest comes from the platform's file


def test_the_platforms_file_given_as_the_workers_own_gets_a_pointer() -> None:
    with pytest.raises(ConfigError) as err:
        load({}, PLATFORM_EXAMPLE)
    assert "--platform-config" in str(err.value) and "\n" not in str(err.value)


def test_a_bad_value_in_the_platforms_file_names_where_it_is(tmp_path: Path) -> None:
    path = tmp_path / "platform.yaml"
    path.write_text("redis:\n  addr: redis:6379\n  dlq:\n    max_length: lots\n")
    with pytest.raises(ConfigError) as err:
        load({}, platform_path=path)
    assert str(err.value) == (f"{path} (platform config 'redis.dlq.max_length'): "
                              "'streams.max_length' expects an integer, got 'lots'")


def test_check_config_takes_the_platforms_file() -> None:
    result = CliRunner().invoke(cli, ["check-config", "--platform-config", str(PLATFORM_EXAMPLE),
                                      "--show"])
    assert result.exit_code == 0, result.output
    assert '"host": "postgresql.kubernaut-system.svc.cluster.local"' in result.output


def test_sentinels_and_their_errors() -> None:
    cfg = load({"DLQ_WORKER_REDIS_SENTINELS": "s1:26379, s2:26380",
                "DLQ_WORKER_REDIS_MASTER_NAME": "dlq"})
    assert cfg.redis.sentinel_addrs == [("s1", 26379), ("s2", 26380)]
    with pytest.raises(ConfigError) as err:
        load({"DLQ_WORKER_REDIS_SENTINELS": "s1:26379"})
    assert "'redis.master_name'" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load({"DLQ_WORKER_REDIS_SENTINELS": "s1", "DLQ_WORKER_REDIS_MASTER_NAME": "dlq"})
    assert "'redis.sentinels' expects host:port" in str(err.value)


@pytest.mark.parametrize("addr", ["not-a-valid:addr:1", "host:99999", ":6379", "host:", "a b:1"])
def test_a_bad_redis_addr_from_the_environment_is_refused_saying_where(addr: str) -> None:
    with pytest.raises(config_mod.ConfigError) as err:
        config_mod.load(env={"REDIS_ADDR": addr})
    assert str(err.value).startswith("environment: 'redis.addr' expects host:port")


@pytest.mark.parametrize("addr", ["127.0.0.1:6379", "redis:6379", "[::1]:6379",
                                  "valkey.ns.svc.cluster.local:6380", "rediss://redis:6380"])
def test_good_redis_addrs_are_accepted(addr: str) -> None:
    assert config_mod.load(env={"REDIS_ADDR": addr}).redis.port in (6379, 6380)
