"""/v1/wallet: the calling company's balances and ledger entries."""

from __future__ import annotations

import uuid

from flask.views import MethodView
from flask_smorest import Blueprint
from marshmallow import Schema, fields, validate

from api.auth import current_principal
from api.jobs import runtime
from pipeline.tables import TRANSACTION_TYPES
from pipeline.wallets import list_transactions, wallet_summary

blp = Blueprint("wallet", __name__, url_prefix="/v1/wallet",
                description="Credits: available, held by running jobs, and used.")


class WalletSchema(Schema):
    walletId = fields.String()
    available = fields.String(metadata={"description": "Credits free to spend"})
    held = fields.String(metadata={"description": "Credits held by jobs still running"})
    used = fields.String(metadata={"description": "Credits charged so far"})
    openHolds = fields.Integer()


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
