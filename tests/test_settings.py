"""The configuration schema (settings.py): layers deep-merged over the
defaults, every key present, unknown keys and wrong types refused with the
key's full path named, and the three ways of starting refusing a bad file
with that message instead of a traceback."""
from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path

import pytest

import settings
from app import create_app
from conftest import ROOT
from settings import ConfigError

VENV_BIN = ROOT / ".venv" / "bin"


def load_file(tmp_path: Path, content, **env) -> dict:
    """``settings.load`` on a config file holding ``content`` (JSON-encoded unless a str)."""
    path = tmp_path / "config.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return settings.load(tmp_path, environ={"TEMPMAIL_CONFIG": str(path), **env})


def refusal(tmp_path: Path, content) -> str:
    with pytest.raises(ConfigError) as caught:
        load_file(tmp_path, content)
    return caught.value.format_message()


def key_paths(conf: dict, prefix: str = "") -> set[str]:
    """Every path of a loaded configuration, plans and list entries included."""
    paths = set()
    for name, value in conf.items():
        paths.add(prefix + name)
        if isinstance(value, dict):
            paths |= key_paths(value, f"{prefix}{name}.")
    return paths


# --------------------------------------------------------------------------
# merging

def test_a_partial_section_keeps_the_other_defaults(tmp_path):
    conf = load_file(tmp_path, {"smtp": {"port": 25}})
    assert conf["smtp"]["port"] == 25
    assert conf["smtp"]["host"] == "127.0.0.1"
    assert conf["smtp"]["max_connections"] == 500 and conf["smtp"]["hostname"] is None


def test_a_partial_plans_map_keeps_premium_and_fills_a_new_plan(tmp_path):
    conf = load_file(tmp_path, {"plans": {"free": {"monthly_quota": 7}, "gold": {"monthly_quota": 9}}})
    assert conf["plans"]["free"] == {"monthly_quota": 7, "domain_types": ["free"], "mailbox_lifetime_seconds": 600}
    assert conf["plans"]["premium"] == {"monthly_quota": 500000, "domain_types": ["free", "premium"],
                                        "mailbox_lifetime_seconds": 3600}
    assert conf["plans"]["gold"] == {"monthly_quota": 9, "domain_types": ["free"], "mailbox_lifetime_seconds": 600}


def test_lists_replace_and_list_entries_get_their_defaults(tmp_path):
    conf = load_file(tmp_path, {"reserved_usernames": ["boss"], "domains": [{"domain": "a.test"}]})
    assert conf["reserved_usernames"] == ["boss"]
    assert conf["domains"] == [{"domain": "a.test", "type": "free", "custom": False}]


def test_every_key_is_present_after_loading(tmp_path):
    conf = load_file(tmp_path, {})
    assert key_paths(conf) == key_paths(settings.defaults())
    assert conf["rate_limits"]["api_mailbox_create"] == {"limit": 0, "window_seconds": 60}
    assert conf["storage"] == {"backend": "filesystem", "inline_max_bytes": 131072, "min_free_bytes": None}
    assert conf["legacy_api"]["enabled"] is True and conf["webhooks"]["allow_private"] is False


def test_imap_port_follows_tls_unless_set(tmp_path):
    assert load_file(tmp_path, {})["imap"]["port"] == 143
    assert load_file(tmp_path, {"imap": {"tls": "ssl"}})["imap"]["port"] == 993
    assert load_file(tmp_path, {"imap": {"tls": True, "port": 1993}})["imap"]["port"] == 1993


def test_loaded_configurations_share_nothing(tmp_path):
    first = load_file(tmp_path, {})
    first["plans"]["free"]["domain_types"].append("premium")
    first["smtp"]["port"] = 1
    second = load_file(tmp_path, {})
    assert second["plans"]["free"]["domain_types"] == ["free"] and second["smtp"]["port"] == 2525


def test_environment_overrides_the_file(tmp_path):
    conf = load_file(tmp_path, {"database_url": "sqlite:///file.db", "secret_key": "from-file"},
                     DATABASE_URL="postgresql://db/tempmail", SECRET_KEY="from-env")
    assert conf["database_url"] == "postgresql://db/tempmail" and conf["secret_key"] == "from-env"
    kept = load_file(tmp_path, {"database_url": "sqlite:///file.db"}, DATABASE_URL="")
    assert kept["database_url"] == "sqlite:///file.db"


def test_create_app_overrides_are_deep_merged(app_factory):
    app = app_factory({"smtp": {"max_connections": 2}, "plans": {"free": {"monthly_quota": 3}}})
    conf = app.config["TEMPMAIL"]
    assert conf["smtp"] == {**settings.defaults()["smtp"], "max_connections": 2}
    assert conf["plans"]["free"]["monthly_quota"] == 3 and conf["plans"]["free"]["domain_types"] == ["free"]
    assert conf["plans"]["premium"]["monthly_quota"] == 500000


def test_missing_config_json_falls_back_to_the_example(tmp_path, caplog):
    (tmp_path / "config.example.json").write_text(json.dumps({"site_name": "Example"}))
    with caplog.at_level(logging.WARNING, logger="tempmail"):
        conf = settings.load(tmp_path, environ={})
    assert conf["site_name"] == "Example"
    assert "config.json not found; using config.example.json" in caplog.text


def test_the_shipped_example_is_valid():
    example = json.loads((ROOT / "config.example.json").read_text())
    settings.validate(example, "config.example.json")


# --------------------------------------------------------------------------
# refusals

def test_an_unknown_key_is_named_with_the_closest_known_key(tmp_path):
    message = refusal(tmp_path, {"smtp": {"prot": 25}})
    assert message == f'{tmp_path / "config.json"}: unknown key "smtp.prot" (did you mean "smtp.port"?)'


def test_nested_and_misplaced_unknown_keys(tmp_path):
    message = refusal(tmp_path, {
        "rate_limits": {"login": {"windw_seconds": 5}},
        "plans": {"gold": {"monthly_qouta": 5}},
        "domains": [{"domain": "a.test", "typ": "free"}],
        "purge_interval": 30,
        "smpt": {"port": 25},
        "zzzzzz": 1})
    assert 'unknown key "rate_limits.login.windw_seconds" (did you mean "rate_limits.login.window_seconds"?)' \
        in message
    assert 'unknown key "plans.gold.monthly_qouta" (did you mean "plans.gold.monthly_quota"?)' in message
    assert 'unknown key "domains[0].typ" (did you mean "domains[0].type"?)' in message
    assert 'unknown key "purge_interval" (did you mean "smtp.purge_interval"?)' in message
    assert 'unknown key "smpt" (did you mean "smtp"?)' in message
    assert 'unknown key "zzzzzz"\n' in message + "\n"  # nothing close: no guess
    assert len(message.splitlines()) == 6


@pytest.mark.parametrize("content, expected", [
    ({"smtp": {"port": "x"}}, '"smtp.port" must be an integer (got a string)'),
    ({"catch_all": "yes"}, '"catch_all" must be a boolean (got a string)'),
    ({"max_message_bytes": True}, '"max_message_bytes" must be an integer (got a boolean)'),
    ({"smtp": 25}, '"smtp" must be an object (got an integer)'),
    ({"plans": {"gold": []}}, '"plans.gold" must be an object (got a list)'),
    ({"plans": {"free": {"domain_types": ["gold"]}}},
     '"plans.free.domain_types" must be a list of "free" / "premium" (got a list)'),
    ({"domains": {"domain": "a.test"}}, '"domains" must be a list of objects (got an object)'),
    ({"domains": [{"type": "free"}]}, '"domains[0].domain" is missing'),
    ({"storage": {"backend": "s3"}}, '"storage.backend" must be "filesystem" or "database" (got a string)'),
    ({"cors_origins": 5}, '"cors_origins" must be a string or list of strings (got an integer)'),
    ({"smtp": {"port": 70000}}, '"smtp.port" must be between 0 and 65535 (got 70000)'),
    ({"mailbox_lifetime_seconds": -1}, '"mailbox_lifetime_seconds" must be at least 0 (got -1)'),
    ({"timezone": "Mars/Base"}, '"timezone" is not a known time zone (got "Mars/Base")'),
    ({"lmtp": {"mode": "660x"}}, '"lmtp.mode" must be an octal file mode such as "0660" (got "660x")'),
    ({"imap": {"tls": "yes"}}, '"imap.tls" must be true or false or "ssl" or "starttls" (got a string)'),
])
def test_a_wrong_type_or_value_is_named(tmp_path, content, expected):
    assert refusal(tmp_path, content) == f'{tmp_path / "config.json"}: {expected}'


def test_hostile_names_are_escaped_and_cut(tmp_path):
    message = refusal(tmp_path, {"smtp": {"x\n" + "y" * 100: 1}, "plans": {"\u001b[31m": 1}})
    assert message.count("\n") == 1  # one line per problem, no line of the file's making
    assert 'unknown key "smtp.x\\n' + "y" * 58 + '…"' in message
    assert '"plans.\\u001b[31m" must be an object (got an integer)' in message


def test_a_file_that_is_not_a_json_object(tmp_path):
    broken = refusal(tmp_path, '{"smtp": {"a": 1 "b": 2}}')
    assert broken.endswith("config.json: not valid JSON: Expecting ',' delimiter (line 1, column 18)")
    assert "the configuration must be a JSON object (got a list)" in refusal(tmp_path, [])


def test_create_app_refuses_bad_overrides():
    with pytest.raises(ConfigError) as caught:
        create_app({"TESTING": True, "TEMPMAIL": {"smtp": {"host": "127.0.0.1", "prot": 25}}})
    assert caught.value.format_message() == \
        'create_app overrides: unknown key "smtp.prot" (did you mean "smtp.port"?)'


# --------------------------------------------------------------------------
# the README table

def test_readme_holds_exactly_the_generated_table():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert settings.readme_section(readme) == settings.markdown(), \
        "README.md's configuration table is stale: run `python settings.py --readme`"


def test_every_schema_key_is_in_the_table():
    table = settings.markdown()
    for path in settings.all_paths():
        assert f"| `{path}` |" in table, path


# --------------------------------------------------------------------------
# start-up with a bad file: a message, no traceback, a non-zero status

BAD = {"smtp": {"prot": 25}, "catch_all": "yes"}
EXPECTED = ('unknown key "smtp.prot" (did you mean "smtp.port"?)', '"catch_all" must be a boolean (got a string)')


def start(tmp_path: Path, *cmd: str) -> subprocess.CompletedProcess:
    config = tmp_path / "bad.json"
    config.write_text(json.dumps(BAD))
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "SECRET_KEY")}
    env.update(TEMPMAIL_CONFIG=str(config), PYTHONUNBUFFERED="1")
    return subprocess.run(list(cmd), cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def assert_refused(result: subprocess.CompletedProcess, prefix: str) -> None:
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for line in EXPECTED:
        assert f"bad.json: {line}" in result.stderr, result.stderr
    assert prefix in result.stderr, result.stderr


@pytest.mark.parametrize("command", [["smtpd", "--port", "0"], ["init-db"], ["domains", "list"]])
def test_flask_commands_stop_with_the_message(tmp_path, command):
    result = start(tmp_path, str(VENV_BIN / "flask"), "--app", "app", *command)
    assert_refused(result, "Error: ")
    assert result.returncode == 78  # EX_CONFIG


def test_gunicorn_stops_with_the_message(tmp_path):
    result = start(tmp_path, str(VENV_BIN / "gunicorn"), "--bind", "127.0.0.1:0", "--workers", "2",
                   "wsgi:application")
    assert_refused(result, "TempMail cannot start: ")
    assert result.returncode == 4 and "App failed to load." in result.stderr  # no endless re-forking
    assert result.stderr.count("TempMail cannot start") <= 2


def test_pipe_mode_tempfails_with_the_message(tmp_path):
    result = start(tmp_path, str(VENV_BIN / "python"), "mailhandler.py", "pipe", "--to", "a@example.com")
    assert_refused(result, "mailhandler: cannot start: ")
    assert result.returncode == 75  # the MTA keeps the message and retries after the fix
