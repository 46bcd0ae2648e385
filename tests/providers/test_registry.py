"""The registry: built from settings, which providers need keys, and plug-ins by entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from pipeline.config import Settings
from providers.registry import build_registry, queue_for

PLUGIN = '''
"""A third-party provider, installed as a package; no edit to the pipeline's code."""
from pipeline.provider import Output


class EchoProvider:
    name = "echo"
    content_types = frozenset({"text"})

    def estimate_usage(self, content_type, prompt, settings):
        return {"characters": len(prompt)}

    def start(self, request):
        data = request.prompt.encode()
        return Output(data, "text/plain", "txt", {"characters": len(request.prompt)})

    def check(self, request, remote_id):
        raise NotImplementedError

    def cancel(self, request, remote_id):
        return None


def make(settings):
    return EchoProvider()
'''


def test_a_provider_installed_as_a_package_registers_itself(tmp_path):
    (tmp_path / "echo_provider.py").write_text(textwrap.dedent(PLUGIN))
    dist = tmp_path / "echo_provider-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: echo-provider\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[content_pipeline.providers]\necho = echo_provider:make\n")
    script = (
        "import json; from pipeline.config import Settings;"
        "from providers.registry import build_registry;"
        "r = build_registry(Settings.from_env());"
        "out = r.get('echo').start(__import__('pipeline.provider').provider.GenerationRequest("
        "'j', 'text', 'hi there'));"
        "print(json.dumps({'names': r.names(), 'data': out.data.decode(),"
        " 'usable': sorted(r.platform_configured())}))"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "PIPELINE_DATA_DIR": str(tmp_path / "v"),
           "PIPELINE_ENV_FILE": str(tmp_path / "no.env")}
    env.pop("OPENAI_API_KEY", None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=60, check=True)
    result = json.loads(proc.stdout)
    assert "echo" in result["names"]
    assert result["data"] == "hi there"
    assert "echo" in result["usable"]  # needs no key
    assert "openai" not in result["usable"]  # no platform key in this environment


def test_keyed_providers_are_usable_once_the_platform_has_a_key(tmp_path):
    settings = Settings.from_env(environ={"PIPELINE_DATA_DIR": str(tmp_path),
                                          "STABILITY_API_KEY": "sk-x",
                                          "COMFY_WORKER_URL": "http://a:8188, http://b:8188"})
    registry = build_registry(settings)
    assert registry.platform_configured() >= {"local", "stability", "comfyui"}
    assert "openai" not in registry.platform_configured()
    assert {"openai", "elevenlabs", "runway", "heygen"} <= set(registry.names())


def test_queue_names_are_stable():
    assert [queue_for(n) for n in ("local", "comfyui", "openai", "runway")] == [
        "local", "gpu.comfyui", "saas.openai", "saas.runway"]
