"""The wheel is a whole install: built from the checkout and installed into a fresh virtual
environment elsewhere, its `pipeline db upgrade` and `pipeline demo` run on the embedded
default with nothing read from the checkout (the Dockerfile installs the same wheel)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from pipeline.migrations import HEAD
from tests.conftest import ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # `pipeline demo` starts a worker and beat

# Names the checkout's tests or an operator's shell may set; the installed command must
# find its settings as a new user's would (./var, ./.env in its working folder).
SETTINGS = ("DATABASE_URL", "CELERY_BROKER_URL", "STORAGE_URL", "S3_ENDPOINT_URL", "PUBLIC_URL",
            "SECRET_KEY", "PROVIDER_KEY_SECRETS", "PIPELINE_DATA_DIR", "PIPELINE_ENV_FILE")


def run(*args, cwd: Path, env: dict | None = None, timeout: int = 300):
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The bin folder of a new virtual environment holding only the wheel (its
    dependencies are read from this one's site-packages, which stays out of the way:
    a plain path in a .pth file, so the checkout's editable install is not switched on)."""
    tmp = tmp_path_factory.mktemp("wheel")
    # Build from a copy of what git would commit, so nothing built or left over in the
    # checkout (build/, *.egg-info, var/) can reach the wheel.
    listed = run("git", "-C", ROOT, "ls-files", "-z", "--cached", "--others",
                 "--exclude-standard", cwd=tmp).stdout.split("\0")
    src = tmp / "src"
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    # No build isolation: the build tools come from the dev extras, not from an index.
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
        "-w", tmp / "dist", src,
        cwd=tmp)
    [wheel] = (tmp / "dist").glob("content_pipeline-*.whl")

    venv = tmp / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp)
    python = venv / "bin" / "python"
    purelib = run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))",
                  cwd=tmp).stdout.strip()
    (Path(purelib) / "project-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
        "--quiet", wheel, cwd=tmp)
    return venv / "bin"


def user_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in SETTINGS and k != "PYTHONPATH"}


def test_the_installed_code_is_the_wheel_not_the_checkout(installed, tmp_path):
    where = run(installed / "python", "-c",
                "import json, api.wsgi, celeryconfig, pipeline.migrations, providers, service.cli,"
                " tasks.worker; print(json.dumps([m.__file__ for m in (api.wsgi, celeryconfig,"
                " pipeline.migrations, providers, service.cli, tasks.worker)]))",
                cwd=tmp_path, env=user_env())
    venv = installed.parent
    assert all(Path(f).is_relative_to(venv) for f in json.loads(where.stdout)), where.stdout


def test_the_installed_command_upgrades_a_database_and_runs_the_demo(installed, tmp_path):
    upgraded = run(installed / "pipeline", "db", "upgrade", cwd=tmp_path, env=user_env())
    assert upgraded.stdout.strip() == (f"database sqlite:///{tmp_path}/var/pipeline.db: "
                                       f"upgraded from empty to {HEAD}")

    demo = run(installed / "pipeline", "demo", "--json", cwd=tmp_path, env=user_env(),
               timeout=240)
    report = json.loads(demo.stdout[demo.stdout.index("{"):])
    assert [j["status"] for j in report["jobs"]] == ["completed"] * 4
    assert all(j["problem"] is None and j["bytes"] > 0 for j in report["jobs"])
