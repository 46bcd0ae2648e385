"""The ledger under any order of operations, replays included, on real PostgreSQL.

A hypothesis state machine drives pipeline.ledger with deposits, holds, posts, voids,
late charges and replays of each, keeps the expected balances in Python, and checks
the invariants of DESIGN.md against the database after every step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import delete, func, select, update

from pipeline import ledger
from pipeline.audit import audit
from pipeline.db import init_db, make_engine, new_id
from pipeline.errors import InsufficientCredits, LedgerConflict, PipelineError
from pipeline.tables import credit_holds, jobs, metadata, providers, transactions
from tests.builders import assert_wallet_matches_ledger, make_company, wallet_of

pytestmark = pytest.mark.postgres

ZERO = Decimal("0.000000")
TTL = 3600  # long enough that no hold expires while a machine runs

# Whole numbers make collisions with the balance likely (exact fits, one too many);
# six-place decimals cover the rounding the ledger must never do.
amounts = st.one_of(
    st.integers(min_value=0, max_value=30).map(Decimal),
    st.decimals(min_value=0, max_value=30, places=6),
)
positive = amounts.filter(lambda a: a > 0)
hold_amounts = positive | st.just(ZERO)  # a zero hold is legal and writes no entry


@dataclass
class JobModel:
    id: object
    hold: Decimal | None = None  # the held amount, once a reservation succeeded
    hold_status: str | None = None  # open, settled, voided
    debit: Decimal | None = None  # what `debit:<job>` holds, from a settle or a late charge


@dataclass
class WalletModel:
    available: Decimal = ZERO
    held: Decimal = ZERO
    used: Decimal = ZERO
    deposits: dict[str, Decimal] = field(default_factory=dict)


class LedgerMachine(RuleBasedStateMachine):
    """One company's wallet and its jobs; each example starts with a fresh company."""

    engine = None  # bound by the test to a database of its own

    deposit_keys = Bundle("deposit_keys")
    job_ids = Bundle("job_ids")

    def __init__(self):
        super().__init__()
        # An empty ledger for each example: the audit scans the whole database, so this
        # keeps it fast (shrinking runs thousands of examples) and its findings ours.
        with self.engine.begin() as conn:
            for table in reversed(metadata.sorted_tables):
                if table is not providers:
                    conn.execute(delete(table))
        self.company = make_company(self.engine, credits=0, name="property")
        self.wallet = WalletModel()
        self.jobs: dict[object, JobModel] = {}

    # -- helpers ---------------------------------------------------------------------------

    def _holds(self, status: str) -> list[JobModel]:
        # Creation order, never id order: ids are random, and hypothesis must see the
        # same choices when it replays an example.
        return [j for j in self.jobs.values() if j.hold_status == status]

    # Picks aim at open holds, closed ones (replays) and any job (often one with no hold)
    # alike; drawing from all jobs alone would mostly find no hold.
    def _pick(self, data) -> JobModel:
        groups = [self._holds("open"), self._holds("settled") + self._holds("voided"),
                  list(self.jobs.values())]
        return data.draw(st.one_of(*(st.sampled_from(g) for g in groups if g)))

    def _set_job(self, job_id, **values) -> None:
        """Mirror the job row the way lifecycle does, so the audit's job checks apply."""
        with self.engine.begin() as conn:
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(**values))

    def _deposit(self, amount) -> str:
        key = f"payment:{new_id()}"
        with self.engine.begin() as conn:
            assert ledger.deposit(conn, self.company.wallet_id, amount, key=key)
        self.wallet.deposits[key] = amount
        self.wallet.available += amount
        return key

    def _settle(self, job: JobModel, actual) -> None:
        with self.engine.begin() as conn:
            debited = ledger.settle(conn, job.id, actual)
        if job.hold_status != "open":
            assert debited is None  # a replay, or a voided hold: never posted again
            event("settle: nothing open")
            return
        event("settle: above the hold" if actual > job.hold else "settle: within the hold")
        debit = min(actual, job.hold)
        assert debited == debit
        job.hold_status = "settled"
        if debit > 0:
            job.debit = debit
        self.wallet.held -= job.hold
        self.wallet.used += debit
        self.wallet.available += job.hold - debit
        self._set_job(job.id, status="completed", actual_cost=debit)

    def _void(self, job: JobModel) -> None:
        with self.engine.begin() as conn:
            refunded = ledger.void(conn, job.id, reason="failed")
        if job.hold_status != "open":
            assert refunded is None
            event("void: nothing open")
            return
        event("void: refunded")
        assert refunded == job.hold
        job.hold_status = "voided"
        self.wallet.held -= job.hold
        self.wallet.available += job.hold
        self._set_job(job.id, status="failed")

    def _charge_late(self, job: JobModel, amount) -> None:
        """A result that came after its hold was voided; a second call is a replay."""
        if job.debit is not None:
            # A replay never charges twice: the invariants find the wallet unchanged. The
            # charge is recomputed from today's balance, so the ledger may refuse it as a
            # conflicting use of `debit:<job>`; that is fine, nothing moves either way.
            try:
                with self.engine.begin() as conn:
                    ledger.charge_late(conn, self.company.company_id, job.id, amount)
                event("charge_late: replay")
            except LedgerConflict:
                event("charge_late: replay refused")
            return
        charge = min(amount, self.wallet.available)
        with self.engine.begin() as conn:
            charged = ledger.charge_late(conn, self.company.company_id, job.id, amount)
        # What the wallet allows, never below zero; the shortfall is only recorded.
        assert charged == max(charge, ZERO)
        event("charge_late: charged" if charge > 0 else "charge_late: nothing to charge")
        if charge > 0:
            job.debit = charge
            self.wallet.available -= charge
            self.wallet.used += charge

    # -- rules -----------------------------------------------------------------------------

    @initialize(target=deposit_keys, amount=st.decimals(min_value=1, max_value=60, places=2))
    def opening_deposit(self, amount):
        return self._deposit(amount)

    @initialize(target=job_ids)
    def first_job(self):
        return self.new_job()

    @rule(target=job_ids)
    def new_job(self):
        job_id = new_id()
        with self.engine.begin() as conn:
            conn.execute(jobs.insert().values(
                id=job_id, company_id=self.company.company_id, provider="local",
                content_type="text", prompt="p", status="processing", estimated_cost=ZERO))
        self.jobs[job_id] = JobModel(job_id)
        return job_id

    @rule(target=deposit_keys, amount=positive)
    def deposit(self, amount):
        return self._deposit(amount)

    @rule(key=deposit_keys, amount=st.none() | positive)
    def replay_deposit(self, key, amount):
        """A payment hook's retry: the same terms are a no-op, other terms are refused."""
        first = self.wallet.deposits[key]
        if amount is None or amount == first:
            with self.engine.begin() as conn:
                assert not ledger.deposit(conn, self.company.wallet_id, first, key=key)
            return
        with pytest.raises(LedgerConflict), self.engine.begin() as conn:
            ledger.deposit(conn, self.company.wallet_id, amount, key=key)

    @rule(target=job_ids, amount=hold_amounts)
    def reserve_a_new_job(self, amount):
        job_id = self.new_job()
        self.reserve(job_id, amount)
        return job_id

    @rule(job_id=job_ids, amount=hold_amounts)
    def reserve(self, job_id, amount):
        job = self.jobs[job_id]
        if job.hold is None and amount > self.wallet.available:
            with pytest.raises(InsufficientCredits), self.engine.begin() as conn:
                ledger.reserve(conn, wallet_id=self.company.wallet_id, job_id=job_id,
                               amount=amount, ttl_seconds=TTL)
            with self.engine.connect() as conn:  # rolled back: no hold row is left behind
                assert ledger.get_hold(conn, job_id) is None
            event("reserve: refused")
            return
        with self.engine.begin() as conn:
            hold = ledger.reserve(conn, wallet_id=self.company.wallet_id, job_id=job_id,
                                  amount=amount, ttl_seconds=TTL)
        if job.hold is not None:  # a replay, whatever its amount, finds the first hold
            assert (hold.amount, hold.status) == (job.hold, job.hold_status)
            event("reserve: replay")
            return
        event("reserve: held")
        assert (hold.amount, hold.status) == (amount, "open")
        job.hold, job.hold_status = amount, "open"
        self.wallet.available -= amount
        self.wallet.held += amount

    @rule(data=st.data())
    def settle(self, data):
        job = self._pick(data)
        # The actual cost is usually at most the estimate held, exactly it, or above it.
        held = job.hold or ZERO
        actual = data.draw(st.decimals(min_value=0, max_value=held, places=6)
                           | st.just(held) | amounts)
        self._settle(job, actual)

    @rule(data=st.data())
    def void(self, data):
        job = self._pick(data)
        self._void(job)
        # The provider's result may still come in after the hold is gone.
        if job.hold_status == "voided" and data.draw(st.booleans()):
            self._charge_late(job, data.draw(amounts))

    @precondition(lambda self: self._holds("voided"))
    @rule(data=st.data(), amount=amounts)
    def charge_late(self, data, amount):
        self._charge_late(data.draw(st.sampled_from(self._holds("voided"))), amount)

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def wallet_matches_the_model(self):
        wallet = wallet_of(self.engine, self.company.company_id)
        assert (wallet.credits_available, wallet.credits_held, wallet.credits_used) == (
            self.wallet.available, self.wallet.held, self.wallet.used)
        assert wallet.credits_available >= 0
        assert wallet.credits_held >= 0

    @invariant()
    def wallet_is_the_sum_of_its_transactions(self):
        assert_wallet_matches_ledger(self.engine, self.company.company_id)

    @invariant()
    def each_job_has_one_hold_and_one_entry_per_kind(self):
        with self.engine.connect() as conn:
            holds = conn.execute(
                select(credit_holds.c.job_id, credit_holds.c.amount, credit_holds.c.status)
                .where(credit_holds.c.wallet_id == self.company.wallet_id)
            ).all()
            per_kind = conn.execute(
                select(transactions.c.job_id, transactions.c.type, func.count())
                .where(transactions.c.wallet_id == self.company.wallet_id,
                       transactions.c.job_id.is_not(None))
                .group_by(transactions.c.job_id, transactions.c.type)
                .having(func.count() > 1)
            ).all()
        assert per_kind == []
        assert len(holds) == len({h.job_id for h in holds})
        expected = {(j.id, j.hold, j.hold_status) for j in self.jobs.values()
                    if j.hold is not None}
        assert {(h.job_id, h.amount, h.status) for h in holds} == expected

    @invariant()
    def the_audit_finds_nothing(self):
        # No hold expires within an example (TTL), so not even expired_hold may appear.
        assert audit(self.engine) == []


@pytest.fixture
def ledger_engine(empty_pg_database):
    engine = make_engine(empty_pg_database)
    init_db(engine)
    yield engine
    engine.dispose()


# Hypothesis stops shrinking a failure after five minutes; the timeout leaves it room to
# report the shrunk sequence instead of being cut off mid-shrink.
@pytest.mark.timeout(420)
def test_the_ledger_keeps_its_invariants_under_any_sequence(ledger_engine):
    machine = type("BoundLedgerMachine", (LedgerMachine,), {"engine": ledger_engine})
    run_state_machine_as_test(machine, settings=settings(
        max_examples=30, stateful_step_count=25, deadline=None, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))


# -- Sequences outside the machine's contract that once broke the ledger -------------------
# A negative actual cost minted credits; a late charge on a hold still open let settle
# move balances without an entry. The ledger now refuses both.


def _job(engine, company) -> object:
    job_id = new_id()
    with engine.begin() as conn:
        conn.execute(jobs.insert().values(
            id=job_id, company_id=company.company_id, provider="local", content_type="text",
            prompt="p", status="processing", estimated_cost=ZERO))
    return job_id


def test_a_negative_actual_cost_mints_no_credits(ledger_engine):
    engine = ledger_engine
    company = make_company(engine, credits=10)
    spent, negative = _job(engine, company), _job(engine, company)
    with engine.begin() as conn:
        ledger.reserve(conn, wallet_id=company.wallet_id, job_id=spent, amount=5,
                       ttl_seconds=TTL)
        ledger.settle(conn, spent, 3)
        ledger.reserve(conn, wallet_id=company.wallet_id, job_id=negative, amount=2,
                       ttl_seconds=TTL)
    # A provider reporting negative usage (or a negative price) prices the job below zero.
    with contextlib.suppress(ValueError, PipelineError), engine.begin() as conn:
        ledger.settle(conn, negative, Decimal(-2))  # refusing it is one fix

    wallet = wallet_of(engine, company.company_id)
    assert wallet.credits_available + wallet.credits_held == 7  # 10 deposited, 3 spent
    assert_wallet_matches_ledger(engine, company.company_id)
    assert audit(engine) == []


def test_a_late_charge_then_a_settle_of_the_same_hold_keeps_the_sums(ledger_engine):
    engine = ledger_engine
    company = make_company(engine, credits=10)
    job_id = _job(engine, company)
    with engine.begin() as conn:
        ledger.reserve(conn, wallet_id=company.wallet_id, job_id=job_id, amount=5,
                       ttl_seconds=TTL)
    with contextlib.suppress(ValueError, PipelineError), engine.begin() as conn:
        ledger.charge_late(conn, company.company_id, job_id, 2)  # the hold is open
    with contextlib.suppress(ValueError, PipelineError), engine.begin() as conn:
        ledger.settle(conn, job_id, 2)

    assert_wallet_matches_ledger(engine, company.company_id)
    assert audit(engine) == []
