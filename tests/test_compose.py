"""compose.yaml without Docker: its declarations, and its app services run as local processes.

Docker does not run where the tests run, so the topology test reads compose.yaml the
way compose does (YAML merge keys, `${VAR:-default}` and `${VAR:?error}` interpolation)
and starts each service of the app image (`build: .`) from its own `command`, in its
`depends_on` order, with its own environment. Only what a container has and a laptop
has not is rewritten: the service hostnames become the local PostgreSQL (a database of
the test's own), Redis (a key prefix of its own) and a moto S3 server; published ports
become free local ones; every service gets a data folder and a home of its own, as each
container has its own filesystem. The image-only services (PostgreSQL, Redis, MinIO,
Prometheus, Grafana) are checked for what they declare.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import pytest
import requests
import yaml
from botocore.exceptions import ClientError
from cryptography.fernet import Fernet

from service.demo import check_file
from service.stack import free_port
from tests.builders import auth, wait_for
from tests.conftest import REDIS_URL, ROOT

COMPOSE = ROOT / "compose.yaml"
PROMETHEUS = ROOT / "ops" / "prometheus" / "prometheus.yml"
# The image's PATH: `pipeline`, `gunicorn`, `celery` and `python` of the installed package.
BIN = Path(sys.executable).parent
IMAGE_ONLY = {"postgres", "redis", "minio", "prometheus", "grafana"}
INFRASTRUCTURE = ("postgres", "redis", "minio")
OPS = {"flower", "prometheus", "grafana"}
FAMILIES = ("pipeline", "local", "saas", "gpu", "maintenance")
# A container listens on every interface of its own network; here, loopback only.
ALL_INTERFACES = "0.0.0.0"  # noqa: S104 (read from compose.yaml, never bound here)
DOTENV = {  # what `pipeline secrets generate --env-file .env` and an operator put in .env
    "SECRET_KEY": "compose-test-secret-key",
    "PROVIDER_KEY_SECRETS": Fernet.generate_key().decode(),
    "METRICS_TOKEN": "compose-test-metrics-token",
    "FLOWER_BASIC_AUTH": "ops:compose-test-password",
}
JOBS = {
    "text": ("a haiku about queues", {"maxTokens": 60}),
    "image": ("a lighthouse", {"width": 128, "height": 96}),
    "audio": ("Hello from the workers.", {}),
    "video": ("waves", {"duration": 1, "width": 160, "height": 120}),
}


# --- reading compose.yaml as compose does -------------------------------------------------


class InterpolationError(Exception):
    """What compose refuses to start with: a `${VAR:?message}` whose VAR is unset or empty."""


_VARIABLE = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
                       r"|(?P<bare>\w+))")


def interpolate(value, dotenv: dict[str, str]):
    """compose's variable substitution over every string of the file."""
    if isinstance(value, dict):
        return {k: interpolate(v, dotenv) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, dotenv) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match) -> str:
        if match["escaped"]:
            return "$"
        name = match["name"] or match["bare"]
        given, op, arg = dotenv.get(name), match["op"], match["arg"]
        unset = given is None or (given == "" and op and op.startswith(":"))
        if op in (":-", "-"):
            return arg if unset else given
        if op in (":?", "?") and unset:
            raise InterpolationError(f"required variable {name} is missing a value: {arg}")
        return given or ""

    return _VARIABLE.sub(one, value)


def load_compose(dotenv: dict[str, str] = DOTENV) -> dict:
    # safe_load resolves anchors and `<<` merge keys; compose keeps the `x-` keys aside.
    return interpolate(yaml.safe_load(COMPOSE.read_text()), dotenv)


def app_services(compose: dict) -> dict[str, dict]:
    return {name: svc for name, svc in compose["services"].items() if svc.get("build") == "."}


def argv(command) -> list[str]:
    # A string command is split like a shell's words, with no shell (as compose does).
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def option(words: list[str], name: str) -> str | None:
    return words[words.index(name) + 1] if name in words else None


def worker_services(compose: dict) -> dict[str, list[str]]:
    """Worker services by their queue family."""
    workers = {}
    for svc in app_services(compose).values():
        words = argv(svc["command"])
        if words[:2] == ["pipeline", "worker"]:
            assert option(words, "--queues") not in workers, words
            workers[option(words, "--queues")] = words
    return workers


def healthcheck_argv(test) -> list[str]:
    if isinstance(test, str):
        return ["sh", "-c", test]
    kind, *rest = test
    return ["sh", "-c", rest[0]] if kind == "CMD-SHELL" else rest


# --- what the file declares ----------------------------------------------------------------


def test_compose_declares_the_services_health_checks_and_start_order():
    compose = load_compose()
    services = compose["services"]
    apps = app_services(compose)
    assert set(services) == IMAGE_ONLY | set(apps)
    assert set(apps) == {"init", "api", "beat", "flower", *(f"worker-{f}" for f in FAMILIES)}

    for name in INFRASTRUCTURE:
        assert services[name]["healthcheck"]["test"], name
        assert "profiles" not in services[name], name
    for name in OPS:
        assert services[name]["profiles"] == ["ops"], name

    # init migrates (and makes the bucket) once the database and MinIO are healthy, then
    # exits; everything else of the app waits for it to have exited 0.
    init = apps["init"]
    assert argv(init["command"]) == ["pipeline", "db", "init"]
    assert init["restart"] == "no"
    assert init["depends_on"] == {"postgres": {"condition": "service_healthy"},
                                  "minio": {"condition": "service_healthy"}}
    for name, svc in apps.items():
        if name != "init":
            assert svc["depends_on"]["init"] == {
                "condition": "service_completed_successfully"}, name
            for infra in INFRASTRUCTURE:
                assert svc["depends_on"][infra] == {"condition": "service_healthy"}, name

    # The API under gunicorn, with one metrics folder for its processes, and a liveness
    # check the image can run (it has python, not curl).
    api = argv(apps["api"]["command"])
    assert api[0] == "gunicorn"
    assert option(api, "-c") == "python:service.gunicorn_conf"
    assert (ROOT / "service" / "gunicorn_conf.py").is_file()
    assert option(api, "--bind") == f"{ALL_INTERFACES}:8000"
    assert apps["api"]["ports"] == ["8000:8000"]
    assert "/healthz" in " ".join(healthcheck_argv(apps["api"]["healthcheck"]["test"]))

    # One worker per family, each checked by a ping of its own node; saas waits on HTTP
    # (threads or gevent), gpu has two slots per ComfyUI instance (one instance here).
    workers = worker_services(compose)
    assert sorted(workers) == sorted(FAMILIES)
    by_family = {option(argv(svc["command"]), "--queues"): svc for svc in apps.values()
                 if argv(svc["command"])[:2] == ["pipeline", "worker"]}
    for family, words in workers.items():
        assert option(words, "--hostname") == f"{family}@%h"
        check = healthcheck_argv(by_family[family]["healthcheck"]["test"])
        assert check[:2] == ["sh", "-c"]
        assert f"inspect ping --timeout 10 -d {family}@$HOSTNAME" in check[2], check
    assert option(workers["saas"], "--pool") in ("threads", "gevent")
    assert option(workers["gpu"], "--concurrency") == "2"
    assert [svc for svc in apps.values() if argv(svc["command"]) == ["pipeline", "beat"]]

    # Prometheus scrapes what the services serve: the API's port, every worker family's
    # metrics port, with the token that the app processes are given.
    env = apps["api"]["environment"]
    assert env["WORKER_METRICS_HOST"] == ALL_INTERFACES
    assert env["METRICS_TOKEN"] == DOTENV["METRICS_TOKEN"]
    scrape = {job["job_name"]: job for job in
              yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]}
    worker_sd = scrape["pipeline-worker"]["dns_sd_configs"][0]
    assert sorted(worker_sd["names"]) == sorted(f"worker-{f}" for f in FAMILIES)
    assert str(worker_sd["port"]) == env["WORKER_METRICS_PORT"] == "9808"
    assert scrape["pipeline-api"]["dns_sd_configs"][0] == {"names": ["api"], "type": "A",
                                                           "port": 8000}
    assert services["prometheus"]["secrets"][0]["target"] == "/etc/prometheus/metrics_token"
    assert compose["secrets"]["metrics_token"] == {"environment": "METRICS_TOKEN"}


@pytest.mark.parametrize("missing", ["SECRET_KEY", "PROVIDER_KEY_SECRETS"])
def test_compose_refuses_to_start_without_the_shared_secrets(missing):
    for value in (None, ""):
        dotenv = {k: v for k, v in DOTENV.items() if k != missing}
        if value is not None:
            dotenv[missing] = value
        with pytest.raises(InterpolationError, match="pipeline secrets generate"):
            load_compose(dotenv)


def _strings(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, str):
        yield value


def test_the_example_env_file_names_every_variable_compose_reads():
    names = {m["name"] or m["bare"]
             for text in _strings(yaml.safe_load(COMPOSE.read_text()))
             for m in _VARIABLE.finditer(text) if not m["escaped"]}
    assert {"SECRET_KEY", "PROVIDER_KEY_SECRETS", "METRICS_TOKEN"} <= names
    example = {line.partition("=")[0] for line in (ROOT / ".env.example").read_text().splitlines()
               if "=" in line and not line.startswith("#")}
    assert names - example == set()


# --- the topology, run ---------------------------------------------------------------------


@dataclass
class LocalService:
    """One compose service as a local process group, with its log."""

    name: str
    argv: list[str]
    env: dict[str, str]
    folder: Path
    health: list[str] | None = None
    proc: subprocess.Popen | None = None
    killed: bool = False
    ports: dict[int, int] = field(default_factory=dict)

    @property
    def log_path(self) -> Path:
        return self.folder / "log"

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, cwd=self.folder, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def run(self, words: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
        """A one-off command in this service's environment (`docker compose run`)."""
        return subprocess.run(words, cwd=self.folder, env=self.env, capture_output=True,
                              text=True, timeout=timeout, check=False)

    def healthy(self) -> bool:
        return self.run(self.health).returncode == 0

    def log(self, last: int = 3000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return f"--- {self.name} ---\n{text[-last:]}"

    def terminate(self) -> None:
        """SIGTERM to the process group, as `docker compose stop` sends it to a container
        (once: a second one makes a Celery worker drop its running tasks)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)

    def wait(self, timeout: float = 20) -> None:
        """Waits for the exit; past the timeout, kills the group (compose's SIGKILL)."""
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.killed = True
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def group_gone(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return True
        return False


def _localize(words: list[str], ports: dict[int, int]) -> list[str]:
    """The command as this machine runs it: loopback for all interfaces, free ports for
    the published ones, and at most 2 processes or threads per pool (--concurrency,
    gunicorn's --workers): this machine has 2 cores and shares them with other runs,
    and one or two slots per family prove the routing as well as 32 do."""
    return [str(min(int(word), 2)) if i and words[i - 1] in ("--concurrency", "--workers")
            else _local_word(word, ports) for i, word in enumerate(words)]


def _local_word(word: str, ports: dict[int, int]) -> str:
    word = word.replace(ALL_INTERFACES, "127.0.0.1")
    for container, local in ports.items():
        if word == str(container):
            return str(local)
        if word.endswith(f":{container}"):
            return f"{word.rpartition(':')[0]}:{local}"
        word = word.replace(f":{container}/", f":{local}/")
    return word


def local_service(name: str, svc: dict, tmp_path: Path, *, pg_url: str, prefix: str,
                  s3_url: str, public_url: str, api_port: int) -> LocalService:
    folder = tmp_path / name
    folder.mkdir()
    # Container ports published on the host become free local ports; the API keeps the
    # port its PUBLIC_URL names.
    ports = {int(p.rpartition(":")[2]): (api_port if name == "api" else free_port())
             for p in svc.get("ports", [])}
    env = {k: str(v) for k, v in svc["environment"].items()}
    # The hostnames of the compose network, replaced by the local stand-ins.
    assert "@postgres:5432/" in env["DATABASE_URL"]
    assert env["CELERY_BROKER_URL"].startswith("redis://redis:")
    assert env["S3_ENDPOINT_URL"] == "http://minio:9000"
    env.update(DATABASE_URL=pg_url, CELERY_BROKER_URL=REDIS_URL,
               CELERY_BROKER_KEY_PREFIX=prefix, S3_ENDPOINT_URL=s3_url, PUBLIC_URL=public_url,
               WORKER_METRICS_HOST="127.0.0.1",
               WORKER_METRICS_PORT=str(free_port()) if env.get("WORKER_METRICS_PORT") else "0")
    # What the image gives every container: its PATH, its data folder (Dockerfile ENV),
    # a home (gunicorn keeps its control socket there) and $HOSTNAME.
    env.update(PATH=f"{BIN}{os.pathsep}/usr/bin:/bin", HOME=str(folder),
               PIPELINE_DATA_DIR=str(folder / "var"), HOSTNAME=socket.gethostname(),
               LANG="C.UTF-8", PYTHONUNBUFFERED="1")
    words = _localize(argv(svc["command"]), ports)
    # The command is the image's own: pipeline, gunicorn or celery from the package.
    assert shutil.which(words[0], path=str(BIN)), words
    health = svc.get("healthcheck", {}).get("test")
    return LocalService(name, words, env, folder, ports=ports,
                        health=_localize(healthcheck_argv(health), ports) if health else None)


def start_order(apps: dict[str, dict]) -> list[str]:
    order: list[str] = []

    def visit(name: str, seen: tuple = ()) -> None:
        assert name not in seen, f"a depends_on cycle: {seen}"
        for dep in apps[name].get("depends_on", {}):
            if dep in apps:
                visit(dep, (*seen, name))
        if name not in order:
            order.append(name)

    for name in apps:
        visit(name)
    return order


def _bucket_exists(s3, bucket: str) -> bool:
    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError:
        return False
    return True


def _remove_bucket(s3, bucket: str) -> None:
    if _bucket_exists(s3, bucket):
        for item in s3.list_objects_v2(Bucket=bucket).get("Contents", []):
            s3.delete_object(Bucket=bucket, Key=item["Key"])
        s3.delete_bucket(Bucket=bucket)


def _scrape(url: str) -> str:
    resp = requests.get(url, headers=auth(DOTENV["METRICS_TOKEN"]), timeout=10)
    assert resp.status_code == 200, (url, resp.status_code, resp.text[:300])
    return resp.text


def _sample_sum(text: str, metric: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith((f"{metric}{{", f"{metric} ")))


class Topology:
    """The app services of compose.yaml as local processes, started in depends_on order."""

    def __init__(self, apps: dict[str, dict], services: dict[str, LocalService]):
        self.apps = apps
        self.services = services

    def __getitem__(self, name: str) -> LocalService:
        return self.services[name]

    def logs(self) -> str:
        return "\n".join(s.log() for s in self.services.values())

    def start(self) -> None:
        for name in start_order(self.apps):
            for dep, cond in self.apps[name].get("depends_on", {}).items():
                self._wait_for(dep, cond["condition"])
            self.services[name].start()

    def _wait_for(self, dep: str, condition: str) -> None:
        if dep in INFRASTRUCTURE:
            # The local PostgreSQL, Redis and moto server stand for the healthy images.
            assert condition == "service_healthy", dep
        elif condition == "service_completed_successfully":
            assert self.services[dep].proc.wait(90) == 0, self.logs()
        elif condition == "service_healthy":
            wait_for(self.services[dep].healthy, timeout=60, interval=1,
                     message=f"{dep} to be healthy:\n{self.logs()}")
        else:
            assert condition == "service_started", condition

    def running(self) -> dict[str, LocalService]:
        return {name: s for name, s in self.services.items() if name != "init"}

    def stop(self) -> None:
        # Every service at once, as `docker compose down` does, then wait for each.
        for service in self.services.values():
            service.terminate()
        for service in self.services.values():
            service.wait()


def _run_jobs(api_url: str, api_key: str) -> dict[str, dict]:
    """Submits one job of each content type through the API; their job views."""
    ids = {}
    for ctype, (prompt, settings) in JOBS.items():
        resp = requests.post(f"{api_url}/v1/jobs", headers=auth(api_key), timeout=30,
                             json={"contentType": ctype, "prompt": prompt, "settings": settings})
        assert resp.status_code == 202, resp.text
        ids[ctype] = resp.json()["jobId"]
    return ids


def _wait_for_jobs(api_url: str, api_key: str, ids: dict[str, str], logs) -> dict[str, dict]:
    def finished(job_id: str):
        view = requests.get(f"{api_url}/v1/jobs/{job_id}", headers=auth(api_key),
                            timeout=30).json()
        return view if view["status"] in ("completed", "failed", "cancelled") else None

    return {ctype: wait_for(lambda job_id=job_id: finished(job_id), timeout=90, interval=0.5,
                            message=f"the {ctype} job:\n{logs()}")
            for ctype, job_id in ids.items()}


def _check_flower(url: str, logs) -> None:
    """Flower (--profile ops) answers with the logins from .env, and only with them."""
    def refuses_strangers():
        try:
            return requests.get(url, timeout=5).status_code == 401
        except requests.ConnectionError:
            return False

    wait_for(refuses_strangers, timeout=60, interval=0.5, message=f"Flower:\n{logs()}")
    login = tuple(DOTENV["FLOWER_BASIC_AUTH"].split(":"))
    assert requests.get(url, auth=login, timeout=10).status_code == 200


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_the_compose_topology_runs_a_job_of_each_content_type(
        empty_pg_database, own_redis_prefix, s3_server, tmp_path):
    apps = app_services(load_compose())
    api_port = free_port()
    api_url = f"http://127.0.0.1:{api_port}"
    topology = Topology(apps, {
        name: local_service(name, svc, tmp_path, pg_url=empty_pg_database,
                            prefix=own_redis_prefix, s3_url=s3_server, public_url=api_url,
                            api_port=api_port)
        for name, svc in apps.items()})
    storage = apps["init"]["environment"]
    bucket = storage["STORAGE_URL"].removeprefix("s3://").split("/")[0]
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1",
                      aws_access_key_id=storage["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=storage["AWS_SECRET_ACCESS_KEY"])
    assert not _bucket_exists(s3, bucket), "another test left the bucket on moto's server"
    running = topology.running()
    try:
        topology.start()
        # init made the results bucket: `pipeline db init` makes STORAGE_URL's bucket.
        assert _bucket_exists(s3, bucket)

        # A company, made as an operator would: `docker compose run --rm init pipeline
        # company create ...`.
        made = topology["init"].run(["pipeline", "company", "create", "compose-test",
                                     "--credits", "20", "--json"])
        assert made.returncode == 0, made.stderr
        api_key = json.loads(made.stdout)["apiKey"]

        wait_for(topology["api"].healthy, timeout=60, interval=0.5,
                 message=f"the API's health check:\n{topology.logs()}")
        ids = _run_jobs(api_url, api_key)

        # Every worker's own health check (a ping of its node) passes while the jobs run.
        workers = [s for name, s in running.items() if name.startswith("worker-")]
        assert len(workers) == len(FAMILIES)
        assert all(w.health for w in workers)
        with ThreadPoolExecutor(len(workers)) as pool:
            assert all(pool.map(lambda w: wait_for(w.healthy, timeout=60, interval=1,
                                                   message=f"{w.name}'s health check"),
                                workers)), topology.logs()

        views = _wait_for_jobs(api_url, api_key, ids, topology.logs)
        for ctype, view in views.items():
            assert view["status"] == "completed", view
            assert view["provider"] == "local"
            assert view["result"]["url"].startswith(f"{s3_server}/{bucket}/")  # presigned
            data = requests.get(view["result"]["url"], timeout=30).content
            assert data
            assert check_file(ctype, data) is None, ctype
            assert len(data) == view["result"]["size"]

        # Metrics as Prometheus reads them, with the token: the API's processes summed
        # (service.gunicorn_conf's shared folder), and each worker node on its own port.
        assert _sample_sum(_scrape(f"{api_url}/metrics"),
                           "pipeline_jobs_submitted_total") == len(JOBS)
        scraped = {w.name: _scrape(f"http://127.0.0.1:{w.env['WORKER_METRICS_PORT']}/metrics")
                   for w in workers}
        assert _sample_sum(scraped["worker-local"], "pipeline_tasks_total") >= len(JOBS)

        _check_flower(f"http://127.0.0.1:{running['flower'].ports[5555]}/", topology.logs)

        dead = [name for name, s in running.items() if s.proc.poll() is not None]
        assert not dead, f"exited early: {dead}\n{topology.logs()}"
    finally:
        topology.stop()
        _remove_bucket(s3, bucket)

    # Every process, pool children included, ended on SIGTERM; none had to be killed.
    assert not [s.name for s in running.values() if s.killed], topology.logs()
    assert all(s.group_gone() for s in running.values()), topology.logs()
