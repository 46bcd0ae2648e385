"""ComfyUI graphs in API format, made unique per job, and the files a run lists (API-NOTES 6)."""

from __future__ import annotations

import mimetypes
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

DEFAULT_CHECKPOINT = "sd_xl_base_1.0.safetensors"
SAMPLERS = ("euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_sde", "ddim", "uni_pc")
SCHEDULERS = ("normal", "karras", "simple", "sgm_uniform", "exponential", "ddim_uniform", "beta")
JOB_FOLDER = "pipeline"  # every job's files land in pipeline/<prompt id>/ on the instance
JOB_INPUT = "pipeline_job"  # an input no node declares, holding the prompt id (see for_job)
MEDIA_KEYS = ("images", "gifs", "video", "videos", "audio")  # where output nodes list files
# The formats ComfyUI's savers write, so the answer does not depend on the host's mime.types.
MEDIA_TYPES = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "gif": "image/gif",
    "mp4": "video/mp4",
    "webm": "video/webm",
    "mov": "video/quicktime",
    "mkv": "video/x-matroska",
    "mp3": "audio/mpeg",
    "wav": "audio/wav",
    "flac": "audio/flac",
    "ogg": "audio/ogg",
    "opus": "audio/opus",
    "m4a": "audio/mp4",
}


def sdxl_text_to_image(
    prompt: str,
    *,
    negative: str = "",
    width: int = 1024,
    height: int = 1024,
    steps: int = 25,
    seed: int = 0,
    cfg: float = 7.0,
    sampler: str = "euler",
    scheduler: str = "normal",
    checkpoint: str = DEFAULT_CHECKPOINT,
    filename_prefix: str = "sdxl",
) -> dict[str, dict[str, Any]]:
    """The standard SDXL graph: checkpoint -> two text encodes -> KSampler -> decode -> save.

    Node ids follow ComfyUI's own example so operators recognise the graph in the queue.
    A "/" in `filename_prefix` becomes the output subfolder.
    """
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "5": {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": width, "height": height, "batch_size": 1},
        },
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["4", 1]}},
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": seed,
                "steps": steps,
                "cfg": cfg,
                "sampler_name": sampler,
                "scheduler": scheduler,
                "denoise": 1.0,
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
            },
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {
            "class_type": "SaveImage",
            "inputs": {"images": ["8", 0], "filename_prefix": filename_prefix},
        },
    }


def is_link(value: Any, graph: dict[str, Any]) -> bool:
    """Whether an input value is a link `["<node id>", <output index>]` to a node of the graph."""
    return isinstance(value, list) and len(value) == 2 and str(value[0]) in graph


def upstream(graph: dict[str, Any], node_ids: Iterable[str]) -> set[str]:
    """The nodes and everything they depend on: what ComfyUI runs for these outputs."""
    seen: set[str] = set()
    todo = [str(n) for n in node_ids if str(n) in graph]
    while todo:
        node_id = todo.pop()
        if node_id in seen:
            continue
        seen.add(node_id)
        inputs = (graph[node_id] or {}).get("inputs") or {}
        todo.extend(str(v[0]) for v in inputs.values() if is_link(v, graph))
    return seen


def for_job(graph: dict[str, Any], prompt_id: str) -> dict[str, Any]:
    """A copy of the graph that no earlier prompt's cache can answer for (a new dict).

    ComfyUI caches a node's result by its class and inputs, upstream included, and reports a
    cached output node's files as they were: another prompt's (maybe another company's, maybe
    deleted since). So every output node gets an input that holds our prompt id:
    - a saver's string `filename_prefix` becomes `pipeline/<prompt id>/<its prefix>`, which
      also keeps a job's files in a folder of their own;
    - any other sink (a preview, or a saver whose prefix is a link) gets a `pipeline_job`
      input. Validation and execution ignore inputs a node does not declare, but the cache
      signature includes every input (comfy_execution/caching.py), so it is a new node.
    Upstream nodes stay as they are, so a shared checkpoint loader is still reused.
    """
    linked = {
        str(v[0]) for node in graph.values() for v in _inputs(node).values() if is_link(v, graph)
    }
    unique = {}
    for node_id, node in graph.items():
        inputs = dict(_inputs(node))
        prefix = inputs.get("filename_prefix")
        if isinstance(prefix, str):
            inputs["filename_prefix"] = job_prefix(prompt_id, prefix)
        elif node_id not in linked:
            inputs[JOB_INPUT] = prompt_id
        unique[node_id] = {**node, "inputs": inputs}
    return unique


def job_prefix(prompt_id: str, prefix: str) -> str:
    """`pipeline/<prompt id>/<prefix>`, the prefix kept inside that folder (no `..`, no root)."""
    parts = [p for p in re.split(r"[\\/]+", prefix) if p not in ("", ".", "..")]
    return "/".join([JOB_FOLDER, prompt_id, *(parts or ["ComfyUI"])])


def _inputs(node: Any) -> dict[str, Any]:
    inputs = node.get("inputs") if isinstance(node, dict) else None
    return inputs if isinstance(inputs, dict) else {}


@dataclass(frozen=True)
class ListedFile:
    """One file an output node listed in the history."""

    node_id: str
    filename: str
    subfolder: str
    folder: str  # "output" for saved files, "temp" for previews
    mime_type: str
    kind: str  # "image", "video" or "audio": what it counts as for the job's content type

    @property
    def extension(self) -> str:
        return self.filename.rpartition(".")[2].lower()


def media_of(filename: str, animated: bool) -> tuple[str, str]:
    """(MIME type, kind) of an output file; an animated image (WEBP, GIF, APNG) is a video."""
    mime = MEDIA_TYPES.get(filename.rpartition(".")[2].lower())
    mime = mime or mimetypes.guess_type(filename)[0] or "application/octet-stream"
    kind = mime.partition("/")[0]
    return mime, "video" if kind == "image" and animated else kind


def listed_files(outputs: Any) -> list[ListedFile]:
    """Every file the history's outputs list, node by node in id order ("2" before "10")."""
    nodes = outputs if isinstance(outputs, dict) else {}
    order = sorted(nodes, key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0, n))
    return [found for node_id in order for found in _node_files(node_id, nodes[node_id])]


def _node_files(node_id: str, ui: Any) -> list[ListedFile]:
    if not isinstance(ui, dict):
        return []
    animated = any(ui.get("animated") or ())  # e.g. [true] from SaveAnimatedWEBP, SaveVideo
    items = [
        item
        for key in MEDIA_KEYS
        for item in ui.get(key) or []
        if isinstance(item, dict) and isinstance(item.get("filename"), str)
    ]
    return [
        ListedFile(
            node_id,
            item["filename"],
            item.get("subfolder") or "",
            item.get("type") or "output",
            *media_of(item["filename"], animated),
        )
        for item in items
    ]
