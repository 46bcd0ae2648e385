"""The `pipeline` command: database setup, companies, wallets, and running the stack."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from decimal import Decimal, InvalidOperation
from pathlib import Path

from pipeline.config import (
    ConfigError,
    Settings,
    database_url_of,
    environment,
    read_dotenv,
    sqlite_file,
)

# What a command needs before it runs: nothing (`secrets generate`), the settings, or
# the settings and an existing database.
NOTHING, SETTINGS, DATABASE = "nothing", "settings", "database"


def _emit(args, data: dict, lines: list[str]) -> None:
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        print("\n".join(lines))


def _runtime(settings: Settings, *, with_publisher: bool = False):
    from service.runtime import build_runtime

    publisher = None
    if with_publisher:
        from tasks.app import create_celery
        from tasks.chain import CeleryPublisher

        publisher = CeleryPublisher(create_celery(settings))
    return build_runtime(settings, publisher=publisher)


def _ensure_db(runtime):
    """The schema at head, the price table seeded, the bucket made; what the upgrade did."""
    from pipeline.db import init_db

    done = init_db(runtime.engine)
    ensure = getattr(runtime.storage, "ensure_bucket", None)
    if ensure:
        ensure()
    return done


def _credits(value: str) -> Decimal:
    try:
        amount = Decimal(value)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if amount < 0 or not amount.is_finite():
        raise argparse.ArgumentTypeError("credits must be zero or more")
    return amount


def _uuid(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an id: {value!r}") from None


def cmd_db_init(args, settings):
    runtime = _runtime(settings)
    _emit_upgrade(args, runtime.engine, _ensure_db(runtime), ready=True)


def cmd_db_upgrade(args, settings):
    from pipeline.migrations import upgrade

    engine = _runtime(settings).engine
    _emit_upgrade(args, engine, upgrade(engine, args.revision))


def _emit_upgrade(args, engine, done, *, ready: bool = False) -> None:
    url = engine.url.render_as_string(hide_password=True)
    if not done.changed:
        line = f"database {url}: already at revision {done.after}"
    elif done.adopted:
        line = (f"database {url}: made before migrations, found at revision {done.before}; "
                f"upgraded to {done.after}")
    else:
        line = f"database {url}: upgraded from {done.before or 'empty'} to {done.after}"
    data = {"database": url, "from": done.before, "to": done.after, "adopted": done.adopted,
            "changed": done.changed}
    _emit(args, {**data, "status": "ready"} if ready else data,
          [line, f"database ready: {url}"] if ready else [line])


def cmd_company_create(args, settings):
    from pipeline.accounts import create_company

    runtime = _runtime(settings)
    _ensure_db(runtime)
    company = create_company(runtime.engine, args.name, credits=args.credits)
    data = {"companyId": str(company.company_id), "walletId": str(company.wallet_id),
            "userId": str(company.user_id), "apiKey": company.api_key,
            "adminKey": company.admin_key, "credits": str(args.credits)}
    _emit(args, data, [
        f"company   {company.company_id}  ({args.name})",
        f"credits   {args.credits}",
        f"api key   {company.api_key}",
        f"admin key {company.admin_key}",
        "Keys are shown once; only their hashes are stored.",
    ])


def cmd_wallet_show(args, settings):
    from pipeline.wallets import wallet_summary

    runtime = _runtime(settings)
    with runtime.engine.connect() as conn:
        data = wallet_summary(conn, args.company)
    _emit(args, data, [f"{k:10} {v}" for k, v in data.items()])


def cmd_wallet_deposit(args, settings):
    from pipeline.wallets import deposit

    result = deposit(_runtime(settings).engine, args.company, args.amount,
                     reference=args.reference, reason=args.reason)
    wallet = result["wallet"]
    _emit(args, result, [
        "deposited" if result["created"] else "already deposited under this reference",
        f"available {wallet['available']}  held {wallet['held']}  used {wallet['used']}",
    ])


def cmd_wallet_transactions(args, settings):
    from pipeline.wallets import list_transactions

    with _runtime(settings).engine.connect() as conn:
        rows = list_transactions(conn, args.company, limit=args.limit, type_=args.type)
    _emit(args, {"transactions": rows},
          [f"{r['createdAt'][:19]}  {r['type']:12} {r['amount']:>14}  {r['key']}" for r in rows])


def cmd_budget_set(args, settings):
    from pipeline.budgets import set_budget

    scope, subject = "company", ""
    if args.user:
        scope, subject = "user", args.user
    elif args.api_key_id:
        scope, subject = "api_key", args.api_key_id
    data = set_budget(_runtime(settings).engine, args.company, period=args.period, cap=args.cap,
                      scope=scope, subject=subject)
    _emit(args, data, [f"{data['period']} cap of {data['cap']} credits for {scope} "
                       f"{subject or args.company}"])


def cmd_keys_rotate(args, settings):
    from cryptography.fernet import InvalidToken

    from pipeline import webhook_secrets
    from pipeline.provider_keys import ProviderKeyUnreadable, cipher, rotate

    secrets = settings.provider_key_secrets
    engine = _runtime(settings).engine
    try:
        count = rotate(engine, cipher(secrets))
    except ProviderKeyUnreadable as exc:
        sys.exit(f"rotation aborted, nothing changed: {exc.message} ({exc.details})")
    # The webhook signing secrets are sealed with the same keys.
    try:
        signing = webhook_secrets.reencrypt(engine, cipher(secrets))
    except InvalidToken:
        sys.exit(f"provider keys re-encrypted ({count}); webhook secrets aborted, nothing "
                 "of them changed: a stored secret no PROVIDER_KEY_SECRETS entry decrypts")
    _emit(args, {"rotated": count, "webhookSecrets": signing, "secrets": len(secrets)}, [
        f"re-encrypted {count} provider keys and {signing} webhook secrets with the newest "
        f"of {len(secrets)} PROVIDER_KEY_SECRETS entries; older entries can now be removed",
    ])


def cmd_ledger_audit(args, settings):
    from pipeline.audit import audit, summary

    findings = audit(_runtime(settings).engine)
    data = {"clean": not findings, "summary": summary(findings),
            "findings": [f.__dict__ for f in findings]}
    lines = [f"{f.check:28} {f.subject}  {f.message}" for f in findings]
    lines.append("ledger clean: every invariant holds" if not findings
                 else f"{len(findings)} finding(s)")
    _emit(args, data, lines)
    if findings:
        sys.exit(2)


def cmd_sweep(args, settings):
    from pipeline.sweeper import sweep

    counts = sweep(_runtime(settings, with_publisher=True))
    _emit(args, counts, [f"{k:13} {v}" for k, v in counts.items()])


def cmd_status(args, settings):
    from pipeline.db import make_engine
    from pipeline.status import lines, report
    from tasks.app import create_celery
    from tasks.probe import BrokerProbe

    # An unreachable database raises here, and main() exits 1 saying so.
    data = report(make_engine(settings.database_url), BrokerProbe(create_celery(settings)),
                  timeout=settings.publish_timeout_seconds)
    _emit(args, data, lines(data))


def cmd_worker(args, settings):
    from service.stack import worker_command
    from tasks.names import QUEUE_FAMILIES

    queues: list[str] = []
    for name in args.queues.split(","):
        queues.extend(QUEUE_FAMILIES.get(name, (name,)))
    if args.loglevel:  # the worker's logging follows LOG_LEVEL (tasks/worker.py)
        os.environ["LOG_LEVEL"] = args.loglevel
    cmd = worker_command(queues, pool=args.pool, concurrency=args.concurrency, beat=args.beat,
                         loglevel=(args.loglevel or settings.log_level).upper(),
                         hostname=args.hostname)
    os.execv(cmd[0], cmd)


def cmd_beat(args, settings):
    if args.loglevel:
        os.environ["LOG_LEVEL"] = args.loglevel
    # --quiet: no banner, so stdout is nothing but log lines.
    quiet = ["--quiet"] if settings.log_format == "json" else []
    cmd = [sys.executable, "-m", "celery", *quiet, "-A", "tasks.worker", "beat",
           "-l", (args.loglevel or settings.log_level).upper()]
    os.execv(cmd[0], cmd)


def cmd_flower(args, settings):
    # Flower shows every task and can stop workers: it never starts without credentials.
    env = environment()
    logins = [entry for entry in env.get("FLOWER_BASIC_AUTH", "").split(",") if entry.strip()]
    if not logins or not all(":" in entry for entry in logins):
        sys.exit("error: set FLOWER_BASIC_AUTH=user:password (comma-separate several logins); "
                 "Flower shows every task and can stop workers, so it never runs without one")
    # The logins reach Flower through its environment, never its command line (ps).
    child_env = {**os.environ, **{k: v for k, v in env.items() if k.startswith("FLOWER_")}}
    cmd = [sys.executable, "-m", "celery", "-A", "tasks.worker", "flower",
           f"--address={args.address}", f"--port={args.port}"]
    os.execve(cmd[0], cmd, child_env)


def cmd_run(args, settings):
    from pipeline.accounts import create_company
    from service.logs import configure_logging
    from service.stack import Stack, port_is_free, stop_on_signals

    if not port_is_free(args.host, args.port):
        sys.exit(f"port {args.port} is in use; pass --port to choose another")
    if not environment().get("LOG_FORMAT"):
        os.environ["LOG_FORMAT"] = "text"  # a person watches this terminal; the worker too
    settings = Settings.from_env(public_url=f"http://{args.host}:{args.port}")
    configure_logging(settings, service="api")
    runtime = _runtime(settings, with_publisher=True)
    _ensure_db(runtime)
    company = create_company(runtime.engine, "local-dev", credits=args.credits)
    stack = Stack(settings, args.host, args.port, concurrency=args.concurrency)
    worker_died = False
    with stop_on_signals():
        try:
            stack.start(runtime)
            _emit(args, {"url": stack.url, "apiKey": company.api_key,
                         "adminKey": company.admin_key,
                         "companyId": str(company.company_id)}, [
                f"API       {stack.url}  (docs: {stack.url}/docs)",
                f"api key   {company.api_key}   ({args.credits} credits, company local-dev)",
                f"try:      curl -s -X POST {stack.url}/v1/jobs -H 'Authorization: Bearer "
                f"{company.api_key}' -H 'Content-Type: application/json' "
                "-d '{\"contentType\":\"image\",\"prompt\":\"a lighthouse at dawn\"}'",
                "Ctrl-C stops everything.",
            ])
            while stack.worker_alive():
                time.sleep(0.5)
            worker_died = True
            print("worker exited; stopping", file=sys.stderr)
        except KeyboardInterrupt:  # Ctrl-C, SIGTERM or SIGHUP
            print("\nstopping...", file=sys.stderr)
        finally:
            stack.stop()
    if worker_died:
        sys.exit(1)


def cmd_secrets_generate(args, settings):
    from pipeline.config import new_secrets

    values = new_secrets()
    if args.env_file:
        added = _fill_env_file(Path(args.env_file), values)
        print(f"{args.env_file}: " + (f"set {' and '.join(added)}" if added else
                                      "already sets both; nothing changed"), file=sys.stderr)
    elif args.json:
        print(json.dumps(values, indent=2))
    else:
        print("\n".join(f"{name}={value}" for name, value in values.items()))


def _fill_env_file(path: Path, values: dict[str, str]) -> list[str]:
    """Sets each name the file leaves unset or empty (as .env.example does); a value
    already there is kept, since replacing a secret in use breaks what it protects."""
    present = read_dotenv(path)
    todo = {name: value for name, value in values.items() if not present.get(name)}
    lines = path.read_text().splitlines() if path.is_file() else []
    filled = set()
    for i, line in enumerate(lines):
        name = line.partition("=")[0].strip()
        if "=" in line and name in todo:
            lines[i] = f"{name}={todo[name]}"
            filled.add(name)
    lines += [f"{name}={value}" for name, value in todo.items() if name not in filled]
    if todo:
        # A new file is the owner's alone; an existing one keeps its mode.
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write("\n".join(lines) + "\n")
    return list(todo)


def cmd_demo(args, settings):
    from service.demo import run_demo

    sys.exit(run_demo(settings, port=args.port, as_json=args.json))


def cmd_bench(args, settings):
    # bench/ lives beside the code, not in the wheel: it imports tests/ helpers and needs
    # PostgreSQL, Redis and RabbitMQ on localhost (the test suite's servers).
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "bench" / "run.py").is_file() and str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))  # an editable install: run from its checkout
    try:
        from bench.run import from_arguments
    except ImportError:
        _fail(args, "the benchmarks run from a checkout of the repository (bench/ and "
                    "tests/ are not installed with the package): `make bench`", "NOT_FOUND")
    sys.exit(from_arguments(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, func, help_, parent=sub, needs=DATABASE):
        p = parent.add_parser(name, help=help_, description=help_)
        p.add_argument("--json", action="store_true", help="print data as JSON")
        p.set_defaults(func=func, needs=needs)
        return p

    db = sub.add_parser("db", help="database commands").add_subparsers(dest="db", required=True)
    command("init", cmd_db_init, "create or upgrade the tables, seed the price table (safe to "
            "run twice)", db, needs=SETTINGS)
    p = command("upgrade", cmd_db_upgrade, "bring the tables to the newest revision, or to "
                "--revision (safe to run twice; adopts a database made before migrations)", db,
                needs=SETTINGS)
    p.add_argument("--revision", default="head", help="a revision id (default: head)")

    company = sub.add_parser("company", help="companies").add_subparsers(dest="company",
                                                                        required=True)
    p = command("create", cmd_company_create, "create a company, its wallet and API keys",
                company, needs=SETTINGS)
    p.add_argument("name")
    p.add_argument("--credits", type=_credits, default=Decimal(0))

    secrets = sub.add_parser("secrets", help="the secrets every process must share")
    p = command("generate", cmd_secrets_generate,
                "print a new SECRET_KEY and PROVIDER_KEY_SECRETS as .env lines",
                secrets.add_subparsers(dest="secrets", required=True), needs=NOTHING)
    p.add_argument("--env-file", metavar="PATH",
                   help="write them into this .env file instead, where it leaves them unset "
                        "or empty (a value already there is kept); a new file is made "
                        "readable by its owner only")

    _money_commands(sub, command)
    _process_commands(sub, command)
    return parser


def _money_commands(sub, command) -> None:
    wallet = sub.add_parser("wallet", help="wallets").add_subparsers(dest="wallet", required=True)
    p = command("show", cmd_wallet_show, "a company's balances", wallet)
    p.add_argument("company", type=_uuid, help="company id")

    p = command("deposit", cmd_wallet_deposit, "add credits (idempotent on --reference)", wallet)
    p.add_argument("company", type=_uuid, help="company id")
    p.add_argument("amount", type=_credits)
    p.add_argument("--reference", required=True, help="your unique id for this deposit")
    p.add_argument("--reason", default="")
    p = command("transactions", cmd_wallet_transactions, "ledger entries, newest first", wallet)
    p.add_argument("company", type=_uuid, help="company id")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--type", default=None)

    budget = sub.add_parser("budget", help="spending caps").add_subparsers(dest="budget",
                                                                          required=True)
    p = command("set", cmd_budget_set, "set a daily or monthly cap", budget)
    p.add_argument("company", type=_uuid, help="company id")
    p.add_argument("--period", choices=("day", "month"), required=True)
    p.add_argument("--cap", type=_credits, required=True)
    who = p.add_mutually_exclusive_group()
    who.add_argument("--user", type=_uuid, help="cap one user of the company")
    who.add_argument("--api-key-id", type=_uuid, help="cap one API key of the company")

    keys = sub.add_parser("keys", help="per-company provider keys").add_subparsers(
        dest="keys", required=True)
    command("rotate", cmd_keys_rotate,
            "re-encrypt stored provider keys with the first PROVIDER_KEY_SECRETS entry", keys)



def _process_commands(sub, command) -> None:
    command("sweep", cmd_sweep, "run one sweep now (beat runs it every few seconds)")
    command("status", cmd_status, "queue depths, live workers, oldest pending job, open "
            "holds, outbox backlog; exits 1 when the database cannot be read")
    ledger = sub.add_parser("ledger", help="the credit ledger").add_subparsers(dest="ledger",
                                                                              required=True)
    command("audit", cmd_ledger_audit,
            "check every ledger invariant; exits 2 when anything is found", ledger)

    p = command("worker", cmd_worker, "start a Celery worker")
    p.add_argument("--queues", default="all",
                   help="comma-separated queues or families: pipeline, local, saas, gpu, "
                        "maintenance, all (default)")
    p.add_argument("--pool", default="threads", help="prefork, threads, gevent, solo")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--beat", action="store_true", help="also run the beat scheduler")
    p.add_argument("--loglevel", default=None, help="overrides LOG_LEVEL (default info)")
    p.add_argument("--hostname", default=None)

    p = command("beat", cmd_beat, "start the beat scheduler (the sweeper's clock)")
    p.add_argument("--loglevel", default=None, help="overrides LOG_LEVEL (default info)")

    p = command("flower", cmd_flower, "Flower, the Celery dashboard, with authentication "
                "(FLOWER_BASIC_AUTH=user:password)", needs=SETTINGS)
    p.add_argument("--address", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5555)

    p = command("run", cmd_run, "API + worker + beat in the foreground until Ctrl-C",
                needs=SETTINGS)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--credits", type=_credits, default=Decimal(100))
    p.add_argument("--concurrency", type=int, default=4)

    p = command("demo", cmd_demo, "start the stack, run one job of each type, check, stop",
                needs=SETTINGS)
    p.add_argument("--port", type=int, default=0, help="API port (default: a free one)")

    p = command("bench", cmd_bench, "benchmarks beside their references (bare Celery, raw "
                "SQL, /healthz) on local PostgreSQL, Redis and RabbitMQ; writes "
                "bench/results/latest.json", needs=NOTHING)
    _bench_arguments(p)


def _bench_arguments(p) -> None:
    p.add_argument("--quick", action="store_true", help="a subset with fewer jobs (< 5 min)")
    p.add_argument("--only", action="append", help="run only this figure (repeatable)")
    p.add_argument("--jobs", type=int, default=None, help="jobs per throughput repetition")
    p.add_argument("--repetitions", type=int, default=None)
    p.add_argument("--out", type=Path, default=None,
                   help="the JSON's path (default bench/results/latest.json)")


def _settings(needs: str) -> Settings | None:
    """The settings a command needs. A command that works on an existing database, run
    where the embedded default has none, says so instead of making an empty ./var and
    failing on a missing table."""
    if needs == NOTHING:
        return None
    env = environment()
    path = sqlite_file(database_url_of(env))
    if needs == DATABASE and path is not None and not path.is_file():
        raise ConfigError(f"no database here ({path} does not exist): create it with "
                          "`pipeline db init` (`pipeline run` and `pipeline demo` make their "
                          "own), or point PIPELINE_DATA_DIR or DATABASE_URL at one")
    return Settings.from_env(env)


def _start_logging(args, settings: Settings | None) -> None:
    """A one-shot command answers on stdout, so its log lines go to stderr, from WARNING
    unless LOG_LEVEL is set. `run` logs as a service; worker and beat log from Celery."""
    if settings is None or args.func in (cmd_run, cmd_worker, cmd_beat):
        return
    from service.logs import configure_logging

    configure_logging(settings, service="cli", stream=sys.stderr,
                      level=None if environment().get("LOG_LEVEL") else "warning")


def _fail(args, message: str, code: str) -> None:
    if args.json:
        print(json.dumps({"error": message, "code": code, "details": {}}))
    else:
        print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    from sqlalchemy.exc import OperationalError, ProgrammingError

    from pipeline.errors import PipelineError

    args = build_parser().parse_args(argv)
    try:
        settings = _settings(args.needs)
        _start_logging(args, settings)
        args.func(args, settings)
    except ConfigError as exc:
        _fail(args, str(exc), "CONFIG_ERROR")
    except PipelineError as exc:
        if args.json:
            print(json.dumps({"error": exc.message, "code": exc.code, "details": exc.details}))
        else:
            print(f"error: {exc.message} ({exc.code})", file=sys.stderr)
        sys.exit(1)
    except (OperationalError, ProgrammingError) as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        _fail(args, f"the database cannot be used: {reason}. If its tables are missing, "
                    "create them with `pipeline db init`.", "DATABASE_ERROR")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
