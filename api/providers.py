"""/v1/providers: which providers this deployment runs, what they make, the settings they read.

The settings listed are the common ones, enough to build a form (the console does);
each adapter checks its own settings when a job is submitted and names the one at
fault, so a setting sent beyond this list is still judged by its provider. Ranges and
defaults are the adapters' own (providers/*, README's provider tables).
"""

from __future__ import annotations

from flask.views import MethodView
from flask_smorest import Blueprint
from marshmallow import Schema, fields

from api.auth import current_principal
from api.jobs import runtime
from pipeline import catalogue
from pipeline import provider_keys as keys_uc

blp = Blueprint("providers", __name__, url_prefix="/v1/providers",
                description="The providers a job can name, and the settings each reads.")


def _int(name, low, high, default, description="", *, even=False):
    hint = description + (" (even)" if even else "")
    return {"name": name, "type": "integer", "minimum": low, "maximum": high,
            "default": default, "description": hint}


def _num(name, low, high, default, description=""):
    return {"name": name, "type": "number", "minimum": low, "maximum": high,
            "default": default, "description": description}


def _text(name, description="", default=None):
    return {"name": name, "type": "string", "default": default, "description": description}


def _choice(name, choices, default, description=""):
    return {"name": name, "type": "string", "enum": list(choices), "default": default,
            "description": description}


def _json(name, description):
    return {"name": name, "type": "object", "default": None, "description": description}


_SIZE = ("width", "height")
# provider -> content type -> settings. A provider missing here still appears, with none.
SETTINGS: dict[str, dict[str, list[dict]]] = {
    "local": {
        "text": [_int("maxTokens", 1, 4000, 256, "Most words to write")],
        "image": [_int(n, 64, 2048, 512, "Pixels") for n in _SIZE],
        "audio": [_text("voice", "An eSpeak NG voice name", "en"),
                  _int("speed", 80, 450, 175, "Words per minute")],
        "video": [_int("duration", 1, 30, 4, "Seconds"),
                  _int("width", 64, 1280, 320, "Pixels", even=True),
                  _int("height", 64, 1280, 240, "Pixels", even=True),
                  _int("fps", 1, 30, 12, "Frames per second")],
    },
    "openai": {
        "text": [_text("model", "A chat model", None), _int("maxTokens", 1, 128_000, 1024),
                 _num("temperature", 0, 2, None), _text("systemPrompt")],
        "image": [_choice("quality", ("low", "medium", "high"), "medium"),
                  _choice("size", ("1024x1024", "1024x1536", "1536x1024", "auto"),
                          "1024x1024"),
                  _choice("outputFormat", ("png", "jpeg", "webp"), "png")],
        "audio": [_text("voice", "A speech voice", "alloy"),
                  _choice("format", ("mp3", "opus", "aac", "flac", "wav", "pcm"), "mp3"),
                  _num("speed", 0.25, 4.0, 1.0)],
        "video": [_choice("model", ("sora-2", "sora-2-pro"), "sora-2"),
                  _text("size", "WxH, as the model allows", "720x1280"),
                  _choice("seconds", ("4", "8", "12"), "4")],
    },
    "stability": {
        "image": [_text("model", "core, ultra or an sd3.5 model", "core"),
                  _text("aspectRatio", "e.g. 1:1, 16:9", "1:1"), _text("negativePrompt"),
                  _int("seed", 0, 4_294_967_294, None),
                  _choice("outputFormat", ("png", "jpeg", "webp"), "png"),
                  _text("stylePreset")],
    },
    "elevenlabs": {
        "audio": [_text("voiceId", "An ElevenLabs voice id"), _text("modelId"),
                  _text("outputFormat", "e.g. mp3_44100_128")],
    },
    "runway": {
        "video": [_text("model"), _text("ratio", "e.g. 1280:720"),
                  _int("duration", 5, 10, 5, "Seconds"), _text("promptImage", "An image URL"),
                  _int("seed", 0, 4_294_967_295, None)],
        "image": [_text("model"), _text("ratio", "e.g. 1920:1080"),
                  _int("seed", 0, 4_294_967_295, None)],
    },
    "heygen": {
        "video": [_text("avatarId"), _text("voiceId"), _int("width", 128, 3840, 1280),
                  _int("height", 128, 3840, 720)],
    },
    "comfyui": {
        kind: [_int("width", 64, 4096, 1024), _int("height", 64, 4096, 1024),
               _int("steps", 1, 150, 30), _int("seed", 0, 2**53, None),
               _num("cfg", 0, 30, 7.0), _text("negativePrompt"), _text("checkpoint"),
               _json("workflow", "A ComfyUI API-format graph: image, video or audio")]
        for kind in ("image", "video", "audio")
    },
}


class SettingSchema(Schema):
    name = fields.String()
    type = fields.String(metadata={"description": "integer, number, string or object"})
    minimum = fields.Float(metadata={"description": "For numbers"})
    maximum = fields.Float(metadata={"description": "For numbers"})
    default = fields.Raw(allow_none=True, metadata={"description": "Used when absent"})
    enum = fields.List(fields.String(), metadata={"description": "The allowed values"})
    description = fields.String()


class ProviderSchema(Schema):
    name = fields.String()
    contentTypes = fields.List(fields.String())
    keyed = fields.Boolean(metadata={"description": "Needs an API key at the provider"})
    configured = fields.Boolean(metadata={
        "description": "Usable by this company now: keyless, a platform key, or its own key"})
    queue = fields.String()
    settings = fields.Dict(keys=fields.String(), values=fields.List(
        fields.Nested(SettingSchema)), metadata={"description": "Per content type"})


class ProviderList(Schema):
    providers = fields.List(fields.Nested(ProviderSchema))


@blp.route("")
class Providers(MethodView):
    @blp.response(200, ProviderList)
    def get(self):
        """The providers this deployment runs, with the content types each makes and the
        settings it reads for each (name, type, range, choices, default).

        `configured` says whether this company can use the provider now. Settings not
        listed may still be accepted: the provider checks them on submit.
        """
        rt = runtime()
        own_keys = {k["provider"] for k in keys_uc.list_keys(
            rt.engine, current_principal().company_id)}
        usable = rt.registry.platform_configured() | own_keys
        listed = []
        for name in rt.registry.names():
            provider = rt.registry.get(name)
            kinds = sorted(provider.content_types)
            known = SETTINGS.get(name, {})
            listed.append({
                "name": name, "contentTypes": kinds, "keyed": name in catalogue.KEYED,
                "configured": name in usable, "queue": catalogue.queue_for(name),
                "settings": {kind: known.get(kind, []) for kind in kinds}})
        return {"providers": listed}
