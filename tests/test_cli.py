"""The `pipeline` command as operators meet it: making the secrets, a folder without a
database, and `pipeline run` stopping what it started."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import requests
from cryptography.fernet import Fernet

from pipeline.config import Settings, read_dotenv
from service.stack import free_port
from tests.builders import wait_for
from tests.conftest import ROOT, child_pids

SERVICES = ("DATABASE_URL", "CELERY_BROKER_URL", "STORAGE_URL", "S3_ENDPOINT_URL", "PUBLIC_URL",
            "SECRET_KEY", "PROVIDER_KEY_SECRETS", "PIPELINE_DATA_DIR", "PIPELINE_ENV_FILE")


def embedded_env(**values) -> dict[str, str]:
    """The embedded default: no service named, no data folder or .env given, so the
    command finds ./var and ./.env in its working folder, as an operator's would."""
    env = {k: v for k, v in os.environ.items() if k not in SERVICES}
    return {**env, "PYTHONPATH": str(ROOT), **values}


def pipeline(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=cwd,
                          env=env or embedded_env(), capture_output=True, text=True, timeout=120,
                          check=False)


def test_secrets_generate_prints_env_lines_and_needs_no_settings(tmp_path):
    # It must work exactly where the other commands refuse: no secrets, not SQLite.
    env = embedded_env(DATABASE_URL="postgresql://pipeline@127.0.0.1:1/none")
    made = [pipeline("secrets", "generate", cwd=tmp_path, env=env) for _ in range(2)]
    assert [p.returncode for p in made] == [0, 0], made[0].stderr
    assert all(p.stderr == "" for p in made)
    lines = [p.stdout.splitlines() for p in made]
    assert [[line.partition("=")[0] for line in pair] for pair in lines] == [
        ["SECRET_KEY", "PROVIDER_KEY_SECRETS"]] * 2
    assert lines[0] != lines[1]  # fresh every time
    secret_key, fernet_key = (line.partition("=")[2] for line in lines[0])
    assert len(secret_key) >= 40
    Fernet(fernet_key)
    assert os.listdir(tmp_path) == []


def test_secrets_generate_fills_an_env_file_once(tmp_path):
    dotenv = tmp_path / ".env"
    shutil.copy(ROOT / ".env.example", dotenv)
    example = (ROOT / ".env.example").read_text()

    made = pipeline("secrets", "generate", "--env-file", str(dotenv), cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert made.stdout == ""  # the secrets went into the file, not onto the terminal
    values = read_dotenv(dotenv)
    assert values["SECRET_KEY"]
    Fernet(values["PROVIDER_KEY_SECRETS"])
    assert [line for line in dotenv.read_text().splitlines()
            if not line.startswith(("SECRET_KEY=", "PROVIDER_KEY_SECRETS="))] == [
        line for line in example.splitlines()
        if not line.startswith(("SECRET_KEY=", "PROVIDER_KEY_SECRETS="))]
    # .env.example with its secrets filled in is a working configuration, even on PostgreSQL.
    settings = Settings.from_env(environ={"PIPELINE_ENV_FILE": str(dotenv),
                                          "DATABASE_URL": "postgresql://pipeline@db/pipeline"})
    assert settings.secret_key == values["SECRET_KEY"]

    before = dotenv.read_text()
    again = pipeline("secrets", "generate", "--env-file", str(dotenv), cwd=tmp_path)
    assert again.returncode == 0
    assert "nothing changed" in again.stderr
    assert dotenv.read_text() == before  # a secret in use is never replaced

    fresh = tmp_path / "new.env"
    assert pipeline("secrets", "generate", "--env-file", str(fresh), cwd=tmp_path).returncode == 0
    assert set(read_dotenv(fresh)) == {"SECRET_KEY", "PROVIDER_KEY_SECRETS"}
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o600


@pytest.mark.parametrize("command", [
    ("wallet", "show", str(uuid.uuid4())),
    ("wallet", "transactions", str(uuid.uuid4())),
    ("ledger", "audit"),
    ("sweep",),
    ("worker",),
])
def test_a_command_in_a_folder_without_a_database_says_how_to_make_one(tmp_path, command):
    proc = pipeline(*command, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"error: no database here ({tmp_path}/var/pipeline.db")
    assert "`pipeline db init`" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1  # no traceback
    assert os.listdir(tmp_path) == []  # and no ./var


def test_db_init_makes_the_database_the_other_commands_use(tmp_path):
    made = pipeline("db", "init", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "var" / "pipeline.db").is_file()
    audited = pipeline("ledger", "audit", cwd=tmp_path)
    assert audited.returncode == 0, audited.stderr
    assert "ledger clean" in audited.stdout
    missing = pipeline("wallet", "show", str(uuid.uuid4()), "--json", cwd=tmp_path)
    assert missing.returncode == 1
    assert "Traceback" not in missing.stderr


def _group(pgid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True,
                         check=False).stdout
    return [int(pid) for pid in out.split()]


@pytest.mark.e2e
def test_pipeline_run_stops_its_worker_and_beat_on_sigterm(tmp_path):
    port = free_port()
    log_path = tmp_path / "run.log"
    with open(log_path, "wb") as log:
        run = subprocess.Popen([sys.executable, "-m", "service.cli", "run", "--port", str(port)],
                               cwd=tmp_path, env=embedded_env(), stdout=log,
                               stderr=subprocess.STDOUT)
    groups: list[int] = []
    try:
        def up():
            assert run.poll() is None, log_path.read_text()
            try:
                healthy = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).ok
            except requests.ConnectionError:
                return False
            text = log_path.read_text()
            return healthy and " ready." in text and "beat: Starting" in text

        wait_for(up, timeout=90, message="the API, the worker and beat")
        # The worker runs in a process group of its own; beat is a process inside it.
        groups = child_pids(run.pid)
        assert len(groups) == 1
        assert len(_group(groups[0])) >= 2

        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=60) == 0, log_path.read_text()
        wait_for(lambda: not any(_group(g) for g in groups), timeout=20,
                 message="the worker and beat to be gone")
        assert "stopping" in log_path.read_text()
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        for pgid in groups:
            if _group(pgid):
                os.killpg(pgid, signal.SIGKILL)


def test_keys_rotate_reencrypts_webhook_secrets_too(tmp_path):
    from pipeline import webhook_secrets
    from pipeline.provider_keys import cipher
    from service.runtime import build_runtime

    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    data = tmp_path / "var"
    env = embedded_env(PIPELINE_DATA_DIR=str(data), PROVIDER_KEY_SECRETS=old)
    made = pipeline("company", "create", "Acme", "--credits", "5", "--json",
                    cwd=tmp_path, env=env)
    assert made.returncode == 0, made.stderr
    company_id = uuid.UUID(json.loads(made.stdout)["companyId"])
    rt = build_runtime(Settings.from_env(environ=env))
    try:
        with rt.engine.begin() as conn:
            before = webhook_secrets.current(conn, cipher((old,)), company_id).current
    finally:
        rt.engine.dispose()

    rotated = pipeline("keys", "rotate", "--json", cwd=tmp_path,
                       env={**env, "PROVIDER_KEY_SECRETS": f"{new},{old}"})
    assert rotated.returncode == 0, rotated.stderr
    assert '"webhookSecrets": 1' in rotated.stdout

    # The old key can go: the secret reads with the new one alone, unchanged.
    rt = build_runtime(Settings.from_env(environ={**env, "PROVIDER_KEY_SECRETS": new}))
    try:
        with rt.engine.begin() as conn:
            assert webhook_secrets.current(conn, cipher((new,)), company_id).current == before
    finally:
        rt.engine.dispose()
