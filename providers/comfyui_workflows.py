"""ComfyUI workflows in API format: the default SDXL text-to-image graph (API-NOTES 6.9)."""

from __future__ import annotations

from typing import Any

DEFAULT_CHECKPOINT = "sd_xl_base_1.0.safetensors"
SAMPLERS = ("euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_sde", "ddim", "uni_pc")
SCHEDULERS = ("normal", "karras", "simple", "sgm_uniform", "exponential", "ddim_uniform", "beta")


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
    filename_prefix: str = "pipeline",
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
