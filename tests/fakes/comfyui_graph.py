"""What ComfyUI's validate_prompt and its cache make of an API-format graph, for the fake server."""

from __future__ import annotations

import hashlib
import json
from typing import Any

# class_type -> required inputs (a subset of nodes.py and comfy_extras). Inputs a node does
# not declare are ignored by validation and execution, as on the real server.
NODES = {
    "CheckpointLoaderSimple": ("ckpt_name",),
    "CLIPTextEncode": ("text", "clip"),
    "EmptyLatentImage": ("width", "height", "batch_size"),
    "EmptyImage": ("width", "height", "batch_size", "color"),
    "KSampler": (
        "model",
        "seed",
        "steps",
        "cfg",
        "sampler_name",
        "scheduler",
        "positive",
        "negative",
        "latent_image",
        "denoise",
    ),
    "VAEDecode": ("samples", "vae"),
    "SaveImage": ("images", "filename_prefix"),
    "PreviewImage": ("images",),
    "SaveAnimatedWEBP": ("images", "filename_prefix", "fps", "lossless", "quality", "method"),
    "CreateVideo": ("images", "fps"),
    "SaveVideo": ("video", "filename_prefix", "format", "codec"),
}
OUTPUT_NODES = ("SaveImage", "PreviewImage", "SaveAnimatedWEBP", "SaveVideo")
MINIMUMS = {"width": 16, "height": 16, "steps": 1, "batch_size": 1}


def error(type_: str, message: str, details: str = "", **extra: Any) -> dict[str, Any]:
    return {"type": type_, "message": message, "details": details, "extra_info": extra}


def links(graph: dict[str, Any], node_id: str) -> list[str]:
    """The nodes an input of this node links to, by input name (as caching.py orders them)."""
    inputs = graph[node_id].get("inputs") or {}
    return [
        str(v[0])
        for _, v in sorted(inputs.items())
        if isinstance(v, list) and len(v) == 2 and str(v[0]) in graph
    ]


def upstream(graph: dict[str, Any], node_id: str) -> list[str]:
    """The node and everything it depends on, dependencies first (an execution order)."""
    order: list[str] = []
    visiting: set[str] = set()  # a cycle stops here instead of recursing forever

    def visit(current: str) -> None:
        if current in visiting:
            return
        visiting.add(current)
        for source in links(graph, current):
            visit(source)
        order.append(current)

    visit(node_id)
    return order


def execution_order(graph: dict[str, Any], outputs: list[str]) -> list[str]:
    order: list[str] = []
    for output in outputs:
        order.extend(n for n in upstream(graph, output) if n not in order)
    return order


def signature(graph: dict[str, Any], node_id: str, path: tuple[str, ...] = ()) -> str:
    """The cache key of a node: its class and every input, a link standing for its source's
    key (comfy_execution/caching.py, CacheKeySetInputSignature)."""
    node = graph[node_id]
    parts: list[Any] = [node["class_type"]]
    for name, value in sorted((node.get("inputs") or {}).items()):
        source = str(value[0]) if isinstance(value, list) and len(value) == 2 else None
        if source in graph and source not in path:
            parts.append([name, "ANCESTOR", signature(graph, source, (*path, node_id)), value[1]])
        else:
            parts.append([name, value])
    encoded = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(encoded).hexdigest()


def inherited(graph: dict[str, Any], node_id: str, name: str, default: Any) -> Any:
    """An input of the node, or else of the first node upstream that has it (sizes, batches)."""
    for current in reversed(upstream(graph, node_id)):
        value = (graph[current].get("inputs") or {}).get(name)
        if value is not None and not isinstance(value, list):
            return value
    return default


def validate(
    graph: Any, checkpoints: list[str]
) -> tuple[dict[str, Any] | None, list[str], dict[str, Any]]:
    """(error, good outputs, node_errors) as validate_prompt reports them: outputs whose
    nodes all validate are good; error is set only when none is."""
    for node_id, node in graph.items():
        if node.get("class_type") not in NODES:
            return (
                error(
                    "missing_node_type",
                    f"Node '{node.get('class_type')}' not found. "
                    "The custom node may not be installed.",
                    f"Node ID '#{node_id}'",
                    node_id=node_id,
                    class_type=node.get("class_type"),
                ),
                [],
                {},
            )
    outputs = [n for n, node in graph.items() if node["class_type"] in OUTPUT_NODES]
    if not outputs:
        return error("prompt_no_outputs", "Prompt has no outputs"), [], {}
    own = {n: _node_errors(graph, n, checkpoints) for n in graph}
    good, node_errors = [], {}
    for output in outputs:
        bad = [n for n in upstream(graph, output) if own[n]]
        if not bad:
            good.append(output)
        for node_id in bad:
            entry = node_errors.setdefault(
                node_id,
                {
                    "errors": own[node_id],
                    "dependent_outputs": [],
                    "class_type": graph[node_id]["class_type"],
                },
            )
            entry["dependent_outputs"].append(output)
    if good:
        return None, good, node_errors
    details = "\n".join(
        f"{e['message']}: {e['details']}" for n in node_errors.values() for e in n["errors"]
    )
    failed = error("prompt_outputs_failed_validation", "Prompt outputs failed validation", details)
    return failed, [], node_errors


def _node_errors(graph: dict, node_id: str, checkpoints: list[str]) -> list[dict]:
    node = graph[node_id]
    errors = [
        _input_error(graph, name, node.get("inputs") or {}, checkpoints)
        for name in NODES[node["class_type"]]
    ]
    return [e for e in errors if e]


def _input_error(graph: dict, name: str, inputs: dict, checkpoints: list[str]) -> dict | None:
    value = inputs.get(name)
    if value is None:
        return error("required_input_missing", "Required input is missing", name, input_name=name)
    if isinstance(value, list) and (len(value) != 2 or str(value[0]) not in graph):
        return error(
            "bad_linked_input",
            "Bad linked input, must be a length-2 list of [node_id, slot_index]",
            f"{name}, {value}",
            input_name=name,
        )
    if name == "ckpt_name" and value not in checkpoints:
        return error(
            "value_not_in_list",
            "Value not in list",
            f"{name}: '{value}' not in {checkpoints}",
            input_name=name,
            received_value=value,
        )
    if name in MINIMUMS and isinstance(value, int) and value < MINIMUMS[name]:
        return error(
            "value_smaller_than_min",
            f"Value {value} smaller than min of {MINIMUMS[name]}",
            name,
            input_name=name,
            received_value=value,
        )
    return None
