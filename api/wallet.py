"""/v1/wallet: the calling company's balances and ledger entries."""

from __future__ import annotations

import uuid

from flask.views import MethodView
from flask_smorest import Blueprint
from marshmallow import Schema, fields, validate

from api.auth import current_principal, require_admin
from api.gate import admin_only
from api.jobs import runtime
from pipeline import budgets, spend
from pipeline import wallets as wallets_uc
from pipeline.ledger import MAX_AMOUNT
from pipeline.tables import TRANSACTION_TYPES
from pipeline.wallets import list_transactions, wallet_summary

blp = Blueprint("wallet", __name__, url_prefix="/v1/wallet",
                description="Credits: available, held by running jobs, and used.")


class BudgetSchema(Schema):
    scope = fields.String(metadata={"description": "company, user or api_key"})
    subject = fields.String(allow_none=True, metadata={"description": "user or key id"})
    period = fields.String(metadata={"description": "day or month (UTC calendar)"})
    cap = fields.String()
    periodStart = fields.String()
    spent = fields.String(metadata={"description": "Charged since the period began"})
    held = fields.String(metadata={"description": "Held by jobs still running"})
    remaining = fields.String()


class WalletSchema(Schema):
    walletId = fields.String()
    available = fields.String(metadata={"description": "Credits free to spend"})
    held = fields.String(metadata={"description": "Credits held by jobs still running"})
    used = fields.String(metadata={"description": "Credits charged so far"})
    openHolds = fields.Integer()
    budgets = fields.List(fields.Nested(BudgetSchema))


class DepositSchema(Schema):
    amount = fields.Decimal(required=True, places=6, as_string=True, validate=validate.Range(
        min=0, min_inclusive=False, max=MAX_AMOUNT))
    reference = fields.String(required=True, validate=validate.Length(1, 200), metadata={
        "description": "Your unique id for this deposit: a retry with it changes nothing"})
    reason = fields.String(load_default="", validate=validate.Length(max=500))


class RefundSchema(Schema):
    jobId = fields.UUID(required=True)
    amount = fields.Decimal(load_default=None, places=6, as_string=True,
                            validate=validate.Range(min=0, min_inclusive=False, max=MAX_AMOUNT),
                            metadata={"description": "Default: the job's whole charge"})
    reference = fields.String(required=True, validate=validate.Length(1, 200))
    reason = fields.String(load_default="", validate=validate.Length(max=500))


class MoneyMoveResult(Schema):
    created = fields.Boolean(metadata={"description": "False when the reference was replayed"})
    wallet = fields.Nested(WalletSchema)


class BudgetSet(Schema):
    period = fields.String(required=True, validate=validate.OneOf(budgets.PERIODS))
    cap = fields.Decimal(required=True, places=6, as_string=True,
                         validate=validate.Range(min=0, max=MAX_AMOUNT))
    scope = fields.String(load_default="company", validate=validate.OneOf(budgets.SCOPES))
    subject = fields.String(load_default="", metadata={
        "description": "The user id or API key id, for user and api_key budgets"})


class TransactionsQuery(Schema):
    limit = fields.Integer(load_default=50, validate=validate.Range(1, 500))
    before = fields.UUID(load_default=None, metadata={
        "description": "Cursor: the id of the last entry of the previous page"})
    type = fields.String(load_default=None, validate=validate.OneOf(TRANSACTION_TYPES))


class TransactionSchema(Schema):
    id = fields.String()
    type = fields.String()
    amount = fields.String()
    jobId = fields.String(allow_none=True)
    key = fields.String()
    metadata = fields.Dict()
    createdAt = fields.String()


class TransactionPage(Schema):
    transactions = fields.List(fields.Nested(TransactionSchema))
    nextCursor = fields.String(allow_none=True)


@blp.route("")
class Wallet(MethodView):
    @blp.response(200, WalletSchema)
    def get(self):
        """The company's wallet."""
        with runtime().engine.connect() as conn:
            return wallet_summary(conn, current_principal().company_id)


@blp.route("/transactions")
class Transactions(MethodView):
    @blp.arguments(TransactionsQuery, location="query")
    @blp.response(200, TransactionPage)
    def get(self, query):
        """Ledger entries, newest first, a page at a time."""
        before: uuid.UUID | None = query["before"]
        with runtime().engine.connect() as conn:
            rows = list_transactions(conn, current_principal().company_id,
                                     limit=query["limit"], before=before, type_=query["type"])
        cursor = rows[-1]["id"] if len(rows) == query["limit"] else None
        return {"transactions": rows, "nextCursor": cursor}


@blp.route("/deposits")
class Deposits(MethodView):
    @admin_only
    @blp.arguments(DepositSchema)
    @blp.response(201, MoneyMoveResult)
    def post(self, body):
        """Add credits (admin key). Idempotent on `reference`."""
        principal = require_admin()
        return wallets_uc.deposit(runtime().engine, principal.company_id, body["amount"],
                                  reference=body["reference"], reason=body["reason"])


@blp.route("/refunds")
class Refunds(MethodView):
    @admin_only
    @blp.arguments(RefundSchema)
    @blp.response(201, MoneyMoveResult)
    def post(self, body):
        """Return part or all of a job's charge (admin key). Idempotent on `reference`."""
        principal = require_admin()
        return wallets_uc.refund(runtime().engine, principal.company_id, body["jobId"],
                                 body["amount"], reference=body["reference"],
                                 reason=body["reason"])


@blp.route("/budgets")
class Budgets(MethodView):
    @blp.response(200, BudgetSchema(many=True))
    def get(self):
        """The company's budgets with this period's spend and open holds."""
        with runtime().engine.connect() as conn:
            return budgets.summaries(conn, current_principal().company_id)

    @admin_only
    @blp.arguments(BudgetSet)
    @blp.response(200, BudgetSchema(many=True))
    def put(self, body):
        """Set a cap (admin key): for the company, a user, or one API key."""
        principal = require_admin()
        budgets.set_budget(runtime().engine, principal.company_id, period=body["period"],
                           cap=body["cap"], scope=body["scope"], subject=body["subject"])
        with runtime().engine.connect() as conn:
            return budgets.summaries(conn, principal.company_id)


class SpendQuery(Schema):
    days = fields.Integer(load_default=30, validate=validate.Range(1, spend.MAX_DAYS), metadata={
        "description": "How many UTC days back, today included"})


class SpendEntry(Schema):
    day = fields.String(metadata={"description": "A UTC calendar day, YYYY-MM-DD"})
    provider = fields.String()
    contentType = fields.String()
    cost = fields.String(metadata={"description": "Credits charged that day, exact decimal"})


class SpendSchema(Schema):
    # "from" is a Python keyword: declared under another name, shown as `from`.
    from_ = fields.String(data_key="from", metadata={"description": "The first day shown"})
    to = fields.String(metadata={"description": "The last day shown (today, UTC)"})
    days = fields.Integer()
    total = fields.String(metadata={"description": "Credits charged in the window"})
    entries = fields.List(fields.Nested(SpendEntry), metadata={
        "description": "One per day, provider and content type charged anything, oldest "
                       "first; days without spend are left out"})


@blp.route("/spend")
class Spend(MethodView):
    @blp.arguments(SpendQuery, location="query")
    @blp.response(200, SpendSchema)
    def get(self, query):
        """Credits charged per UTC day, by provider and content type.

        Read from the usage row each finished job writes with its charge, so failed and
        cancelled jobs count as nothing. What the console's spend chart draws.
        """
        with runtime().engine.connect() as conn:
            result = spend.spend_per_day(conn, current_principal().company_id,
                                         days=query["days"])
        result["from_"] = result.pop("from")
        return result
