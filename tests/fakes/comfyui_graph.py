"""What ComfyUI's validate_prompt says about an API-format graph, for the fake server."""

from __future__ import annotations

import uuid
from typing import Any

# class_type -> required inputs (a subset of nodes.py that the default SDXL graph needs).
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
    "SaveImage": ("images",),
    "PreviewImage": ("images",),
}
OUTPUT_NODES = ("SaveImage", "PreviewImage")
MINIMUMS = {"width": 16, "height": 16, "steps": 1, "batch_size": 1}


def error(type_: str, message: str, details: str = "", **extra: Any) -> dict[str, Any]:
    return {"type": type_, "message": message, "details": details, "extra_info": extra}


def validate(graph: Any, checkpoints: list[str]) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(error, node_errors) as ComfyUI's validate_prompt reports them; (None, {}) when valid."""
    for node_id, node in graph.items():
        if node.get("class_type") not in NODES:
            return error(
                "missing_node_type",
                f"Node '{node.get('class_type')}' not found. The custom node may not be installed.",
                f"Node ID '#{node_id}'",
                node_id=node_id,
                class_type=node.get("class_type"),
            ), {}
    outputs = [n for n, node in graph.items() if node["class_type"] in OUTPUT_NODES]
    if not outputs:
        return error("prompt_no_outputs", "Prompt has no outputs"), {}
    node_errors = {}
    for node_id, node in graph.items():
        errors = [
            _input_error(graph, name, node.get("inputs", {}), checkpoints)
            for name in NODES[node["class_type"]]
        ]
        errors = [e for e in errors if e]
        if errors:
            node_errors[node_id] = {
                "errors": errors,
                "dependent_outputs": outputs,
                "class_type": node["class_type"],
            }
    if not node_errors:
        return None, {}
    details = "\n".join(
        f"{e['message']}: {e['details']}" for n in node_errors.values() for e in n["errors"]
    )
    return error(
        "prompt_outputs_failed_validation", "Prompt outputs failed validation", details
    ), node_errors


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


def canonical(value: Any) -> bool:
    try:
        return isinstance(value, str) and str(uuid.UUID(value)) == value
    except ValueError:
        return False
