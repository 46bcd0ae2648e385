"""The secrets every process shares: required outside SQLite, made once in the embedded mode.

A company provider key encrypted by one API process must be decrypted by any worker, and
a file link signed by one API process must be served by any other; both hold only if
every process has the same SECRET_KEY and PROVIDER_KEY_SECRETS.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import requests
from cryptography.fernet import Fernet

from pipeline.config import ConfigError, Settings, new_secrets
from service.stack import free_port, worker_command
from tests.builders import auth, make_company, stop_process_group, wait_for, wait_terminal
from tests.conftest import ROOT, distributed_env, runtime_for
from tests.fakes.base import bearer
from tests.fakes.stability import FakeStability

SECRET_NAMES = ("SECRET_KEY", "PROVIDER_KEY_SECRETS")
NOWHERE_PG = "postgresql://pipeline@127.0.0.1:1/none"  # never reached: refused before
COMPANY_KEY = "sk-company-stability-4e1a9c70d2"


def _env(tmp_path: Path, **values) -> dict[str, str]:
    return {"PIPELINE_DATA_DIR": str(tmp_path / "var"),
            "PIPELINE_ENV_FILE": str(tmp_path / "no.env"), **values}


def _process_env(tmp_path: Path, **values) -> dict[str, str]:
    """A child's environment: ours without any secret or service, plus `values`."""
    env = {k: v for k, v in os.environ.items()
           if k not in (*SECRET_NAMES, "DATABASE_URL", "CELERY_BROKER_URL", "STORAGE_URL")}
    return {**env, **_env(tmp_path), **values}


@pytest.mark.parametrize("given", [{}, {"SECRET_KEY": "s"},
                                   {"PROVIDER_KEY_SECRETS": Fernet.generate_key().decode()}])
@pytest.mark.parametrize("broker", ["redis://127.0.0.1:6379/0", "filesystem://"])
def test_outside_sqlite_missing_secrets_are_refused_never_made_up(tmp_path, given, broker):
    missing = [name for name in SECRET_NAMES if name not in given]
    with pytest.raises(ConfigError, match="pipeline secrets generate") as refused:
        Settings.from_env(environ=_env(tmp_path, DATABASE_URL=NOWHERE_PG,
                                       CELERY_BROKER_URL=broker, **given))
    assert str(refused.value).startswith(" and ".join(missing) + " ")
    assert not (tmp_path / "var").exists()  # nothing was minted on this host


def test_a_provider_key_secret_that_is_not_a_fernet_key_is_refused(tmp_path):
    good = Fernet.generate_key().decode()
    with pytest.raises(ConfigError, match="entry 2 of 2 is not a Fernet key"):
        Settings.from_env(environ=_env(tmp_path, DATABASE_URL=NOWHERE_PG, SECRET_KEY="s",
                                       PROVIDER_KEY_SECRETS=f"{good}, change-me"))


def test_given_secrets_are_used_as_they_are(tmp_path):
    new, old = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    settings = Settings.from_env(environ=_env(tmp_path, DATABASE_URL=NOWHERE_PG,
                                              SECRET_KEY="s3cret",
                                              PROVIDER_KEY_SECRETS=f"{new}, {old}"))
    assert (settings.secret_key, settings.provider_key_secrets) == ("s3cret", (new, old))


def test_the_embedded_mode_makes_each_secret_once_for_its_owner_only(tmp_path):
    first = Settings.from_env(environ=_env(tmp_path))
    again = Settings.from_env(environ=_env(tmp_path))
    assert (again.secret_key, again.provider_key_secrets) == (
        first.secret_key, first.provider_key_secrets)
    Fernet(first.provider_key_secrets[0])
    folder = tmp_path / "var"
    assert sorted(os.listdir(folder)) == ["provider_key_secrets", "secret_key"]  # no temp
    for name in os.listdir(folder):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600
    # The environment still wins over what the folder keeps.
    assert Settings.from_env(environ=_env(tmp_path, SECRET_KEY="given")).secret_key == "given"


def test_a_process_that_loses_the_race_reads_the_winners_secret(tmp_path, monkeypatch):
    """Another process links its secret into place between our look and our link."""
    folder = tmp_path / "var"
    real_link = os.link
    winners = {}

    def link_after_another_process(src, dst):
        value = new_secrets()[Path(dst).name.upper()]
        Path(dst).write_text(value)
        winners[Path(dst).name] = value
        real_link(src, dst)

    monkeypatch.setattr("pipeline.config.os.link", link_after_another_process)
    settings = Settings.from_env(environ=_env(tmp_path))
    assert settings.secret_key == winners["secret_key"]
    assert settings.provider_key_secrets == (winners["provider_key_secrets"],)
    assert sorted(os.listdir(folder)) == ["provider_key_secrets", "secret_key"]


RACER = """
import sys, time
from pathlib import Path
from pipeline.config import Settings
go = Path(sys.argv[1])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.001)
settings = Settings.from_env()
print(settings.secret_key, *settings.provider_key_secrets, flush=True)
"""


def test_processes_starting_together_on_an_empty_data_folder_agree(tmp_path):
    go = tmp_path / "go"
    env = _process_env(tmp_path, PYTHONPATH=str(ROOT))
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(go)], env=env, cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(8)]
    try:
        for racer in racers:  # every one imported and waits at the line
            assert racer.stdout.readline().strip() == "ready", racer.stderr.read()
        go.touch()
        results = [racer.communicate(timeout=60) for racer in racers]
    finally:
        for racer in racers:
            if racer.poll() is None:
                racer.kill()
    assert all(r.returncode == 0 for r in racers), [err for _, err in results]
    seen = {out.strip() for out, _ in results}
    assert len(seen) == 1, seen
    secret_key, fernet_key = seen.pop().split()
    folder = tmp_path / "var"
    assert (folder / "secret_key").read_text() == secret_key
    assert (folder / "provider_key_secrets").read_text() == fernet_key
    assert sorted(os.listdir(folder)) == ["provider_key_secrets", "secret_key"]


def test_a_worker_without_the_secrets_exits_with_how_to_make_them(tmp_path):
    env = _process_env(tmp_path, DATABASE_URL=NOWHERE_PG)
    # As operators start it (compose.yaml): one paragraph, no traceback.
    proc = subprocess.run([sys.executable, "-m", "service.cli", "worker", "--queues", "pipeline"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: SECRET_KEY and PROVIDER_KEY_SECRETS are not set.")
    assert "`pipeline secrets generate`" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    # Celery started directly, as the tests and `pipeline run` do: it exits too.
    proc = subprocess.run(worker_command(["pipeline"]), cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode != 0
    assert "`pipeline secrets generate`" in proc.stdout + proc.stderr
    assert not (tmp_path / "var").exists()


def _gunicorn(port: int) -> list[str]:
    # No control socket: its default path is one per user, shared by every test run.
    return [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "1",
            "--threads", "4", "--no-control-socket", "api.wsgi:create()"]


def test_an_api_process_without_the_secrets_exits_with_how_to_make_them(tmp_path):
    proc = subprocess.run(_gunicorn(free_port()), cwd=ROOT,
                          env=_process_env(tmp_path, DATABASE_URL=NOWHERE_PG),
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode != 0
    assert "`pipeline secrets generate`" in proc.stdout + proc.stderr
    assert not (tmp_path / "var").exists()


@contextmanager
def api_process(env: dict, log_path: Path):
    """The API under gunicorn, as compose.yaml runs it; yields its base URL once it answers."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(_gunicorn(port), cwd=ROOT,
                                env={**os.environ, **env, "PUBLIC_URL": url},
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def answers():
            assert proc.poll() is None, log_path.read_text()
            try:
                return requests.get(f"{url}/healthz", timeout=5).ok
            except requests.ConnectionError:
                return False

        wait_for(answers, timeout=60, message=f"the API on {url}")
        yield url
    finally:
        stop_process_group(proc)


@pytest.mark.e2e
@pytest.mark.postgres
@pytest.mark.redis
def test_two_api_processes_and_a_worker_with_the_same_secrets_agree(
        empty_pg_database, own_redis_prefix, tmp_path, start_worker):
    """Each process has its own data folder, so nothing can be shared but the environment."""
    shared = new_secrets()
    with ExitStack() as stack:
        stability = stack.enter_context(FakeStability(api_key=COMPANY_KEY))

        def env_for(name: str) -> dict:
            # STABILITY_API_KEY empty: no platform key, so only the company's key can work.
            return distributed_env(tmp_path / name, empty_pg_database, own_redis_prefix,
                                   storage_url=f"file://{tmp_path}/store", STABILITY_API_KEY="",
                                   STABILITY_BASE_URL=stability.url, **shared)

        rt = runtime_for(env_for("setup"))
        stack.callback(rt.engine.dispose)
        company = make_company(rt.engine, credits=100)
        first = stack.enter_context(api_process(env_for("api1"), tmp_path / "api1.log"))
        second = stack.enter_context(api_process(env_for("api2"), tmp_path / "api2.log"))
        start_worker(env_for("worker"), concurrency=2)

        put = requests.put(f"{first}/v1/provider-keys/stability", json={"apiKey": COMPANY_KEY},
                           headers=auth(company.admin_key), timeout=30)
        assert put.status_code == 200, put.text
        submitted = requests.post(f"{second}/v1/jobs", headers=auth(company.api_key), timeout=30,
                                  json={"contentType": "image", "provider": "stability",
                                        "prompt": "a lighthouse at dawn"})
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["jobId"]
        wait_terminal(rt.engine, [job_id], timeout=120)

        # The worker decrypted what the first API process encrypted.
        view = requests.get(f"{first}/v1/jobs/{job_id}", headers=auth(company.api_key),
                            timeout=30).json()
        assert view["status"] == "completed", view
        assert [bearer(r) for r in stability.received("generate")] == [COMPANY_KEY]

        # A link signed by the first API process is served by the second.
        link = view["result"]["url"]
        assert link.startswith(f"{first}/v1/files/")
        elsewhere = second + link.removeprefix(first)
        served = requests.get(elsewhere, timeout=30)
        assert served.status_code == 200, served.text
        assert served.content.startswith(b"\x89PNG\r\n\x1a\n")
        assert served.content == requests.get(link, timeout=30).content
        forged = requests.get(elsewhere.replace("signature=", "signature=0"), timeout=30)
        assert forged.status_code == 403
