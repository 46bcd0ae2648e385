"""/v1/provider-keys: a company's own SaaS provider keys (admin keys only; never shown back)."""

from __future__ import annotations

from flask import current_app
from flask.views import MethodView
from flask_smorest import Blueprint
from marshmallow import RAISE, Schema, fields

from api.auth import require_admin
from api.gate import admin_only
from api.schemas import ErrorEnvelope
from pipeline import provider_keys as keys_uc
from pipeline.config import SAAS_PROVIDERS
from pipeline.errors import NotFound

blp = Blueprint(
    "provider_keys", __name__, url_prefix="/v1/provider-keys",
    description="The company's own API keys for SaaS providers, used instead of the "
                "platform's. Stored encrypted; only a fingerprint is ever shown back. "
                "Every endpoint needs an admin-scoped API key.",
)

_PROVIDERS = ", ".join(SAAS_PROVIDERS)


class ProviderKeyPut(Schema):
    class Meta:
        unknown = RAISE

    apiKey = fields.String(required=True, metadata={
        "description": "The provider's secret key: printable ASCII without spaces, at most "
                       f"{keys_uc.MAX_SECRET_LENGTH} characters. Surrounding whitespace is "
                       "dropped. It is never returned by any endpoint.",
        "writeOnly": True})


class ProviderKey(Schema):
    provider = fields.String(metadata={"description": f"One of {_PROVIDERS}"})
    fingerprint = fields.String(metadata={
        "description": "sha256:<first 12 hex digits of SHA-256 of the key>, then ' …' and its "
                       "last 4 characters for keys of 20 characters or more"})
    createdAt = fields.String()
    updatedAt = fields.String(metadata={"description": "When the key was last replaced"})


class ProviderKeyList(Schema):
    providerKeys = fields.List(fields.Nested(ProviderKey))


def _runtime():
    return current_app.extensions["runtime"]


@blp.route("")
class ProviderKeys(MethodView):
    @admin_only
    @blp.response(200, ProviderKeyList)
    @blp.alt_response(401, schema=ErrorEnvelope, description="Missing or bad API key")
    @blp.alt_response(403, schema=ErrorEnvelope, description="The API key is not admin-scoped")
    def get(self):
        """List the company's stored provider keys.

        Each entry says which provider has a key, its fingerprint and when it was set;
        the keys themselves are never returned.
        """
        principal = require_admin()
        return {"providerKeys": keys_uc.list_keys(_runtime().engine, principal.company_id)}


@blp.route("/<string:provider>")
class ProviderKeyByName(MethodView):
    @admin_only
    @blp.arguments(ProviderKeyPut)
    @blp.response(200, ProviderKey)
    @blp.alt_response(400, schema=ErrorEnvelope,
                      description="Unknown or keyless provider (comfyui, local), or a "
                                  "malformed key")
    @blp.alt_response(401, schema=ErrorEnvelope, description="Missing or bad API key")
    @blp.alt_response(403, schema=ErrorEnvelope, description="The API key is not admin-scoped")
    def put(self, body, provider):
        """Set or replace the company's key for a provider.

        `provider` is one of openai, stability, elevenlabs, runway or heygen. Jobs the
        company submits to that provider afterwards use this key. The response shows the
        key's fingerprint, never the key.
        """
        principal = require_admin()
        rt = _runtime()
        return keys_uc.set_key(rt.engine, keys_uc.cipher(rt.settings.provider_key_secrets),
                               principal.company_id, provider, body["apiKey"])

    @admin_only
    @blp.response(204)
    @blp.alt_response(401, schema=ErrorEnvelope, description="Missing or bad API key")
    @blp.alt_response(403, schema=ErrorEnvelope, description="The API key is not admin-scoped")
    @blp.alt_response(404, schema=ErrorEnvelope,
                      description="PROVIDER_KEY_NOT_FOUND: the company has no key for it")
    def delete(self, provider):
        """Remove the company's key for a provider.

        Jobs submitted afterwards fall back to the platform's key, if one is configured.
        """
        principal = require_admin()
        if not keys_uc.delete_key(_runtime().engine, principal.company_id, provider):
            raise NotFound("PROVIDER_KEY_NOT_FOUND",
                           f"This company has no stored key for '{provider}'.",
                           details={"provider": provider})
