"""ComfyUIProvider against one or two fake ComfyUI instances over real HTTP."""

from __future__ import annotations

import contextlib
import json
import struct
import time
import uuid
from pathlib import Path

import pytest
import requests
import websocket

from pipeline.provider import GenerationRequest, Output, Pending
from pipeline.provider_errors import NotConfiguredError, RejectedError, TransientError
from providers import comfyui_progress
from providers.comfyui import ComfyUIProvider, client_id_for, prompt_id_for, scrub_paths
from providers.comfyui_progress import PromptProgress, ws_url
from providers.comfyui_workflows import JOB_INPUT, for_job, job_prefix, sdxl_text_to_image
from tests.fakes.base import Reply
from tests.fakes.comfyui import FakeComfyUI, ws_accept
from tests.fakes.media import PNG_SIGNATURE

JOB = "5b0e4c8e-9a1d-4f3e-8c57-2d6f1e0a9b31"
PRICES = json.loads((Path(__file__).parents[2] / "pipeline" / "prices.json").read_text())
# API-NOTES 6.8: a graph that needs no model weights.
SMOKE = {
    "1": {
        "class_type": "EmptyImage",
        "inputs": {"width": 64, "height": 32, "batch_size": 1, "color": 16711680},
    },
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "smoke"}},
}


def smoke(batch_size=1, **nodes):
    """SMOKE with another batch size, plus more nodes."""
    graph = json.loads(json.dumps(SMOKE))
    graph["1"]["inputs"]["batch_size"] = batch_size
    return {**graph, **nodes}


PREVIEW = {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}
SAVE_VIDEO = {"filename_prefix": "video/clip", "format": "auto", "codec": "auto"}
VIDEO = {
    "3": {"class_type": "CreateVideo", "inputs": {"images": ["1", 0], "fps": 8.0}},
    "4": {"class_type": "SaveVideo", "inputs": {"video": ["3", 0], **SAVE_VIDEO}},
}
SAVE_WEBP = {"filename_prefix": "anim", "fps": 6.0, "lossless": True, "quality": 80}
WEBP = {
    "class_type": "SaveAnimatedWEBP",
    "inputs": {"images": ["1", 0], **SAVE_WEBP, "method": "default"},
}


@pytest.fixture(autouse=True)
def no_listeners_left():
    # Listeners live per process: one left by a test must not hear the next test's fake.
    yield
    comfyui_progress.close_all()


@pytest.fixture
def fake():
    with FakeComfyUI() as server:
        yield server


@pytest.fixture
def other():
    with FakeComfyUI() as server:
        yield server


def job(job_id=JOB, content_type="image", prompt="a red fox in snow", instance=None, **settings):
    return GenerationRequest(job_id, content_type, prompt, settings, instance=instance)


def wait_for(provider, request, remote_id, seconds=5.0) -> Output:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = provider.check(request, remote_id)
        if isinstance(result, Output):
            return result
        time.sleep(0.01)
    raise AssertionError(f"{remote_id} still pending")


def run(provider, request) -> Output:
    return wait_for(provider, request, provider.start(request).remote_id)


def wait_until(condition, seconds=5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.01)


def png_size(data: bytes) -> tuple[int, int]:
    return struct.unpack(">II", data[16:24])


def prompts_for(server, prompt_id):
    return [r for r in server.received("prompt") if r.json().get("prompt_id") == prompt_id]


def post(server, graph, **body):
    return requests.post(f"{server.url}/prompt", json={"prompt": graph, **body}, timeout=2)


def finished(server, prompt_id) -> dict:
    wait_until(lambda: prompt_id in server.history)
    return server.history[prompt_id]


def view(server, image) -> requests.Response:
    return requests.get(f"{server.url}/view", params=image, timeout=2)


# Running graphs ------------------------------------------------------------------------------


def test_default_sdxl_graph_runs_and_the_png_comes_back(fake):
    provider = ComfyUIProvider([fake.url], timeout=2)
    request = job(width=512, height=768, steps=30, seed=11, negativePrompt="blurry")
    pending = provider.start(request)
    assert isinstance(pending, Pending)
    assert pending.remote_id == f"{fake.url}|{JOB}"  # our job id is ComfyUI's prompt id
    out = wait_for(provider, request, pending.remote_id)
    assert out.data.startswith(PNG_SIGNATURE)
    assert png_size(out.data) == (512, 768)
    assert (out.mime_type, out.extension) == ("image/png", "png")
    assert (out.usage, out.more) == ({"runs": 1, "outputs": 1}, ())
    assert out.metadata["filename"] == "sdxl_00001_.png"
    graph = prompts_for(fake, JOB)[0].json()["prompt"]
    assert graph["3"]["inputs"]["steps"] == 30
    assert graph["3"]["inputs"]["seed"] == 11
    assert graph["7"]["inputs"]["text"] == "blurry"
    assert graph["9"]["inputs"]["filename_prefix"] == f"pipeline/{JOB}/sdxl"


def test_a_callers_own_workflow_runs_with_only_its_outputs_made_the_jobs(fake):
    provider = ComfyUIProvider(fake.url, timeout=2)
    out = run(provider, job(workflow=SMOKE))
    assert png_size(out.data) == (64, 32)
    assert out.metadata["filename"] == "smoke_00001_.png"
    sent = prompts_for(fake, JOB)[0].json()["prompt"]
    assert sent["1"] == SMOKE["1"]
    assert sent["2"]["inputs"] == {"images": ["1", 0], "filename_prefix": f"pipeline/{JOB}/smoke"}
    assert SMOKE["2"]["inputs"]["filename_prefix"] == "smoke"  # the caller's graph is left alone


def test_the_api_prefixed_routes_work_too(fake):
    provider = ComfyUIProvider([f"{fake.url}/api"], timeout=2)
    assert run(provider, job(workflow=SMOKE)).usage == {"runs": 1, "outputs": 1}


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"checkpoint": "nope.safetensors"},
            r"node 4 \(CheckpointLoaderSimple\): Value not in list: ckpt_name: 'nope.safetensors'",
        ),
        ({"workflow": {"1": {"class_type": "Mystery", "inputs": {}}}}, "Node 'Mystery' not found"),
        ({"workflow": {"1": SMOKE["1"]}}, "Prompt has no outputs"),
        ({"workflow": {"2": SMOKE["2"]}}, r"node 2 \(SaveImage\): Bad linked input"),
    ],
)
def test_validation_failures_are_readable_rejections(fake, settings, message):
    with pytest.raises(RejectedError, match=message) as raised:
        ComfyUIProvider([fake.url], timeout=2).start(job(**settings))
    assert raised.value.status == 400


@pytest.mark.parametrize(
    ("settings", "name"),
    [
        ({"width": 1001}, "width"),
        ({"height": 32}, "height"),
        ({"steps": 0}, "steps"),
        ({"sampler": "magic"}, "sampler"),
        ({"cfg": "high"}, "cfg"),
        ({"workflow": "not a graph"}, "workflow"),
        ({"workflow": {"nodes": [], "links": []}}, "workflow"),  # a UI-format export
    ],
)
def test_invalid_settings_are_rejected_naming_the_setting(settings, name):
    provider = ComfyUIProvider(["http://unused"])
    with pytest.raises(RejectedError, match=f"'{name}'"):
        provider.estimate_usage("image", "prompt", settings)


def test_video_and_audio_need_a_workflow():
    provider = ComfyUIProvider(["http://unused"])
    for content_type in ("video", "audio"):
        with pytest.raises(RejectedError, match="'workflow'"):
            provider.estimate_usage(content_type, "prompt", {})


def test_estimate_is_one_run():
    provider = ComfyUIProvider(["http://unused"])
    assert provider.estimate_usage("image", "p", {}) == {"runs": 1}
    assert provider.estimate_usage("video", "p", {"workflow": SMOKE}) == {"runs": 1}


def test_every_unit_reported_is_priced():
    priced = PRICES["comfyui"]["pricing"]
    for content_type in ComfyUIProvider.content_types:
        assert priced[content_type] == {"runs": "0", "outputs": "0"}


def test_no_instances_is_not_configured():
    with pytest.raises(NotConfiguredError):
        ComfyUIProvider([])


# Instances and submission ----------------------------------------------------------------------


def test_instances_are_the_configured_urls_and_remote_ids_name_theirs(fake, other):
    provider = ComfyUIProvider([f"{fake.url}/", f"{other.url}/api"], timeout=2)
    assert provider.instances() == [fake.url, f"{other.url}/api"]
    remote_id = provider.start(job(instance=f"{other.url}/api")).remote_id
    assert provider.instance_of(remote_id) == f"{other.url}/api"
    assert provider.instance_of(f"http://gone:8188/|{JOB}") == "http://gone:8188"
    with pytest.raises(ValueError, match="not a ComfyUI remote id"):
        provider.instance_of(JOB)


def test_start_submits_on_the_leased_instance_even_when_busier(fake, other):
    fake.config["paused"] = True
    for _ in range(3):
        fake.enqueue(SMOKE)
    provider = ComfyUIProvider([fake.url, other.url], timeout=2)
    assert provider.start(job(instance=fake.url)).remote_id == f"{fake.url}|{JOB}"
    assert JOB in [item[1] for item in fake.pending]
    assert prompts_for(other, JOB) == []


def test_a_leased_instance_that_is_not_configured_is_refused(fake):
    provider = ComfyUIProvider([fake.url], timeout=2)
    with pytest.raises(NotConfiguredError, match="not one of the configured instances"):
        provider.start(job(instance="http://elsewhere:8188"))
    assert fake.received("prompt") == []


def test_a_leased_instance_that_does_not_answer_is_transient(fake, other):
    dead = other.url
    other.stop()
    provider = ComfyUIProvider([fake.url, dead], timeout=1)
    with pytest.raises(TransientError, match=f"{dead} did not answer"):
        provider.start(job(instance=dead))
    assert fake.received("prompt") == []  # not moved to another instance behind the worker


def test_the_job_found_on_another_instance_is_not_submitted_on_the_leased_one(fake, other):
    other.config["paused"] = True
    provider = ComfyUIProvider([fake.url, other.url], timeout=2)
    first = provider.start(job(instance=other.url))
    again = provider.start(job(instance=fake.url))  # a restarted worker with a new lease
    assert again.remote_id == first.remote_id == f"{other.url}|{JOB}"
    assert prompts_for(fake, JOB) == []


def test_the_least_loaded_instance_gets_the_job(fake, other):
    for server, load in ((fake, 3), (other, 1)):
        server.config["paused"] = True
        for _ in range(load):
            server.enqueue(SMOKE)
    provider = ComfyUIProvider([fake.url, other.url], timeout=2)
    pending = provider.start(job())
    assert pending.remote_id == f"{other.url}|{JOB}"
    assert JOB in [item[1] for item in other.pending]
    second = provider.start(job(job_id=str(uuid.uuid4())))  # other now holds 2, fake 3
    assert second.remote_id.startswith(other.url)
    third = provider.start(job(job_id=str(uuid.uuid4())))  # 3 and 3: the first listed wins
    assert third.remote_id.startswith(fake.url)


def test_a_queued_job_is_not_submitted_twice(fake, other):
    fake.config["paused"] = True
    provider = ComfyUIProvider([other.url, fake.url], timeout=2)
    other.enqueue(SMOKE)  # make fake the less loaded one
    first = provider.start(job())
    again = provider.start(job())  # a restarted worker calls start again
    assert again.remote_id == first.remote_id == f"{fake.url}|{JOB}"
    assert again.status == "queued"
    assert len(prompts_for(fake, JOB)) == 1
    assert prompts_for(other, JOB) == []


def test_a_finished_job_is_not_submitted_again(fake, other):
    provider = ComfyUIProvider([fake.url, other.url], timeout=2)
    request = job()
    first = provider.start(request)
    wait_for(provider, request, first.remote_id)
    other.config["paused"] = True  # fake is now busier than other, which stays empty
    fake.config["paused"] = True
    fake.enqueue(SMOKE)
    again = provider.start(request)
    assert again.remote_id == first.remote_id
    assert len(prompts_for(fake, JOB)) == 1
    assert prompts_for(other, JOB) == []
    assert wait_for(provider, request, again.remote_id).data.startswith(PNG_SIGNATURE)


def test_non_uuid_job_ids_map_to_one_stable_prompt_id(fake):
    assert prompt_id_for("job-7") == prompt_id_for("job-7") != prompt_id_for("job-8")
    assert prompt_id_for(JOB.upper()) == JOB
    fake.config["paused"] = True
    provider = ComfyUIProvider([fake.url], timeout=2)
    first = provider.start(job(job_id="job-7"))
    assert provider.start(job(job_id="job-7")).remote_id == first.remote_id
    assert len(fake.received("prompt")) == 1


def test_an_unreachable_instance_is_skipped(fake, other):
    dead = other.url
    other.stop()
    provider = ComfyUIProvider([dead, fake.url], timeout=1)
    assert provider.start(job()).remote_id.startswith(fake.url)


def test_no_instance_answering_is_transient(fake):
    fake.push("history", fake.slow(2.0))
    provider = ComfyUIProvider([fake.url], timeout=0.3)
    started = time.monotonic()
    with pytest.raises(TransientError, match="no instance answered"):
        provider.start(job())
    assert time.monotonic() - started < 1.5


def test_a_slow_poll_is_a_transient_timeout(fake):
    fake.config["paused"] = True
    provider = ComfyUIProvider([fake.url], timeout=0.3)
    pending = provider.start(job())
    fake.push("history", fake.slow(2.0))
    with pytest.raises(TransientError, match=r"within 0\.3s"):
        provider.check(job(), pending.remote_id)


def test_a_server_error_on_submit_is_transient(fake):
    fake.push("prompt", Reply(500, "Internal Server Error"))
    with pytest.raises(TransientError):
        ComfyUIProvider([fake.url], timeout=2).start(job())


# Prompt ids and the execution cache, as the real server has them ------------------------------


def test_the_fake_takes_any_string_as_prompt_id_and_runs_a_repeat_again(fake):
    fake.config["paused"] = True
    for _ in range(2):
        answer = post(fake, SMOKE, prompt_id="job-7")
        assert answer.status_code == 200
        assert answer.json()["prompt_id"] == "job-7"
    assert post(fake, SMOKE, prompt_id=None).json()["prompt_id"] == "None"  # str(None)
    assert post(fake, SMOKE, prompt_id=5).json()["prompt_id"] == "5"
    queue = requests.get(f"{fake.url}/queue", timeout=2).json()
    assert [item[1] for item in queue["queue_pending"]] == ["job-7", "job-7", "None", "5"]
    assert requests.post(f"{fake.url}/queue", json={"delete": ["job-7"]}, timeout=2).ok
    assert [item[1] for item in fake.pending] == ["job-7", "None", "5"]  # one per id given


def test_the_fake_answers_a_repeated_graph_from_its_cache_with_the_earlier_file(fake):
    first = finished(fake, post(fake, SMOKE, prompt_id="a").json()["prompt_id"])
    again = finished(fake, post(fake, SMOKE, prompt_id="b").json()["prompt_id"])
    cached = dict(again["status"]["messages"])["execution_cached"]["nodes"]
    assert cached == ["1", "2"]
    assert again["outputs"] == first["outputs"]  # prompt b lists prompt a's file
    image = again["outputs"]["2"]["images"][0]
    assert view(fake, image).status_code == 200
    assert fake.delete_files() == 1
    assert view(fake, image).status_code == 404


def test_the_fake_cache_keeps_only_what_the_last_prompt_used(fake):
    finished(fake, post(fake, SMOKE, prompt_id="a").json()["prompt_id"])
    finished(fake, post(fake, smoke(batch_size=2), prompt_id="b").json()["prompt_id"])
    third = finished(fake, post(fake, SMOKE, prompt_id="c").json()["prompt_id"])
    assert dict(third["status"]["messages"])["execution_cached"]["nodes"] == []


def test_two_jobs_with_the_same_graph_each_get_their_own_file(fake):
    provider = ComfyUIProvider([fake.url], timeout=2)
    first = run(provider, job(workflow=SMOKE))
    fake.delete_files(f"pipeline/{JOB}")  # the first company's file is cleaned up
    second_id = str(uuid.uuid4())
    second = run(provider, job(job_id=second_id, workflow=SMOKE))
    assert second.data.startswith(PNG_SIGNATURE)
    assert (first.more, second.more) == ((), ())
    history = fake.history[second_id]
    assert history["outputs"]["2"]["images"][0]["subfolder"] == f"pipeline/{second_id}"
    # The upstream node is still reused from the first job; only the output node ran again.
    assert dict(history["status"]["messages"])["execution_cached"]["nodes"] == ["1"]


def test_output_nodes_without_a_prefix_are_made_unique_too(fake):
    provider = ComfyUIProvider([fake.url], timeout=2)
    graph = {"1": SMOKE["1"], "2": PREVIEW}
    job_ids = [str(uuid.uuid4()) for _ in range(2)]
    outputs = [run(provider, job(job_id=job_id, workflow=graph)) for job_id in job_ids]
    names = [out.metadata["filename"] for out in outputs]
    assert len(set(names)) == 2
    assert all(name.startswith("ComfyUI_temp_") for name in names)
    sent = [r.json()["prompt"]["2"]["inputs"] for r in fake.received("prompt")]
    assert [inputs[JOB_INPUT] for inputs in sent] == job_ids


def test_a_file_answered_from_the_cache_is_never_delivered(fake):
    # Another prompt ran this job's exact graph first: the job's output node is a cache hit.
    finished(fake, fake.enqueue(for_job(SMOKE, JOB), "someone-else")[1])
    provider = ComfyUIProvider([fake.url], timeout=2)
    with pytest.raises(RejectedError, match=r"output node\(s\) 2 came from another prompt's cache"):
        run(provider, job(workflow=SMOKE))


def test_for_job_marks_only_output_nodes_and_keeps_prefixes_in_the_jobs_folder():
    graph = {
        "1": SMOKE["1"],
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "a/b"}},
        "3": {
            "class_type": "SaveImage",
            "inputs": {"images": ["1", 0], "filename_prefix": ["9", 0]},
        },
        "4": PREVIEW,
        "9": {"class_type": "PrimitiveString", "inputs": {"value": "x"}},
    }
    unique = for_job(graph, "p")
    assert unique["1"] == graph["1"]
    assert unique["2"]["inputs"]["filename_prefix"] == "pipeline/p/a/b"
    assert unique["3"]["inputs"][JOB_INPUT] == "p"  # a linked prefix cannot be rewritten
    assert unique["4"]["inputs"][JOB_INPUT] == "p"
    assert unique["9"] == graph["9"]  # linked to: not an output
    assert JOB_INPUT not in graph["4"]["inputs"]  # the caller's graph is left alone


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        ("ComfyUI", "pipeline/p/ComfyUI"),
        ("video/clip", "pipeline/p/video/clip"),
        ("/etc/../../x", "pipeline/p/etc/x"),
        ("..\\..\\y", "pipeline/p/y"),
        ("", "pipeline/p/ComfyUI"),
    ],
)
def test_job_prefixes_stay_in_the_jobs_folder(prefix, expected):
    assert job_prefix("p", prefix) == expected


# Outputs that fail validation next to ones that pass ------------------------------------------


def broken_second_output() -> dict:
    bad = {"class_type": "EmptyImage", "inputs": {**SMOKE["1"]["inputs"], "width": 0}}
    save = {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "bad"}}
    return {**SMOKE, "3": bad, "4": save}


def test_the_fake_queues_the_valid_outputs_and_reports_the_others(fake):
    fake.config["paused"] = True
    answer = post(fake, broken_second_output(), prompt_id="p")
    assert answer.status_code == 200
    errors = answer.json()["node_errors"]
    assert errors["3"]["dependent_outputs"] == ["4"]
    assert errors["3"]["errors"][0]["type"] == "value_smaller_than_min"
    assert fake.pending[0][4] == ["2"]  # only the valid output runs
    only_bad = {"3": broken_second_output()["3"], "4": broken_second_output()["4"]}
    assert post(fake, only_bad).status_code == 400


def test_a_partly_valid_graph_is_rejected_and_withdrawn_from_the_queue(fake):
    fake.config["paused"] = True
    provider = ComfyUIProvider([fake.url], timeout=2)
    with pytest.raises(RejectedError, match=r"node 3 \(EmptyImage\): Value 0 smaller") as raised:
        provider.start(job(workflow=broken_second_output()))
    assert raised.value.status is None
    assert fake.pending == []
    assert fake.interrupted == []


def test_a_partly_valid_graph_already_running_is_interrupted(fake):
    fake.config["hold"] = True

    def submit_and_start(request):
        reply = fake.handle_prompt(request)
        wait_until(lambda: fake.running is not None)
        return reply

    fake.push("prompt", submit_and_start)
    with pytest.raises(RejectedError, match="failed validation"):
        ComfyUIProvider([fake.url], timeout=2).start(job(workflow=broken_second_output()))
    assert fake.interrupted == [JOB]


# Every output of the job's kind -----------------------------------------------------------------


def test_a_batch_gives_every_image(fake):
    out = run(ComfyUIProvider([fake.url], timeout=2), job(workflow=smoke(batch_size=3)))
    assert out.usage == {"runs": 1, "outputs": 3}
    assert out.metadata["filename"] == "smoke_00001_.png"
    assert [f.metadata["filename"] for f in out.more] == ["smoke_00002_.png", "smoke_00003_.png"]
    assert all(f.data.startswith(PNG_SIGNATURE) and f.mime_type == "image/png" for f in out.more)


def test_every_saved_output_node_is_delivered_in_node_order(fake):
    second = {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "z"}}
    graph = smoke(**{"10": second})
    out = run(ComfyUIProvider([fake.url], timeout=2), job(workflow=graph))
    assert out.metadata["filename"] == "smoke_00001_.png"
    assert [(f.metadata["node"], f.metadata["filename"]) for f in out.more] == [
        ("10", "z_00001_.png")
    ]


def test_previews_count_only_when_nothing_is_saved(fake):
    provider = ComfyUIProvider([fake.url], timeout=2)
    with_save = run(provider, job(workflow=smoke(**{"3": PREVIEW})))
    assert (with_save.usage["outputs"], with_save.metadata["filename"]) == (1, "smoke_00001_.png")
    only_preview = run(
        provider, job(job_id=str(uuid.uuid4()), workflow={"1": SMOKE["1"], "3": PREVIEW})
    )
    assert only_preview.data.startswith(PNG_SIGNATURE)
    assert only_preview.metadata["filename"].startswith("ComfyUI_temp_")


@pytest.mark.parametrize(
    ("graph", "mime_type", "extension"),
    [
        ({"1": SMOKE["1"], **VIDEO}, "video/mp4", "mp4"),
        ({"1": SMOKE["1"], "5": WEBP}, "image/webp", "webp"),  # animated: a video
    ],
)
def test_a_video_job_gets_the_video(fake, graph, mime_type, extension):
    graph = {**graph, "1": {**SMOKE["1"], "inputs": {**SMOKE["1"]["inputs"], "batch_size": 4}}}
    graph["2"] = SMOKE["2"]  # a still frame saved beside it is not the video job's result
    out = run(ComfyUIProvider([fake.url], timeout=2), job(content_type="video", workflow=graph))
    assert (out.mime_type, out.extension, out.usage["outputs"]) == (mime_type, extension, 1)
    assert out.data[:4] in (b"RIFF", b"\x00\x00\x00\x18")


def test_an_image_job_gets_only_the_images_of_a_graph_that_also_saves_video(fake):
    graph = {**smoke(batch_size=2), **VIDEO}
    out = run(ComfyUIProvider([fake.url], timeout=2), job(workflow=graph))
    assert out.usage == {"runs": 1, "outputs": 2}
    assert {out.mime_type, *(f.mime_type for f in out.more)} == {"image/png"}


def test_a_video_job_whose_graph_made_only_images_is_rejected(fake):
    provider = ComfyUIProvider([fake.url], timeout=2)
    with pytest.raises(RejectedError, match=r"made no video, only 2 file\(s\) of image/png"):
        run(provider, job(content_type="video", workflow=smoke(batch_size=2)))


def test_a_file_gone_from_the_instance_is_a_rejection(fake):
    fake.config["paused"] = True
    provider = ComfyUIProvider([fake.url], timeout=2)
    request = job(workflow=SMOKE)
    pending = provider.start(request)
    fake.config["paused"] = False
    finished(fake, JOB)
    fake.delete_files()
    with pytest.raises(RejectedError, match=r"no longer has smoke_00001_\.png"):
        provider.check(request, pending.remote_id)


# Failures, cancelling, and what their messages say ---------------------------------------------


def test_an_execution_error_is_a_rejection_with_the_exception(fake):
    fake.config["error"] = "CUDA out of memory"
    provider = ComfyUIProvider([fake.url], timeout=2)
    request = job(workflow=SMOKE)
    pending = provider.start(request)
    finished(fake, JOB)
    with pytest.raises(RejectedError, match=r"EmptyImage \(node 1\) .* RuntimeError: CUDA out"):
        provider.check(request, pending.remote_id)


@pytest.mark.parametrize(
    "path",
    [
        "/home/comfy/ComfyUI/models/checkpoints/x.safetensors",
        "C:\\ComfyUI\\models\\checkpoints\\x.safetensors",
        "C:\\\\ComfyUI\\\\models\\\\x.safetensors",  # as repr() writes it
        "\\\\gpu-box\\share\\models\\x.safetensors",
    ],
)
def test_runtime_errors_name_files_without_the_hosts_folders(fake, path):
    fake.config["error"] = f"Error while deserializing header: {path}: invalid"
    provider = ComfyUIProvider([fake.url], timeout=2)
    request = job(workflow=SMOKE)
    pending = provider.start(request)
    finished(fake, JOB)
    with pytest.raises(RejectedError) as raised:
        provider.check(request, pending.remote_id)
    assert "header: x.safetensors: invalid" in raised.value.message
    assert "ComfyUI" not in raised.value.message.replace("comfyui:", "")


def test_validation_details_lose_the_hosts_folders_too(fake):
    details = "ckpt_name: Exception: [Errno 2] No such file: '/srv/comfy/models/x.safetensors'"
    error = {"type": "invalid_input_type", "message": "Failed to convert", "details": details}
    node_errors = {"4": {"errors": [error], "dependent_outputs": ["9"], "class_type": "Loader"}}
    fake.push(
        "prompt", Reply(400, {"error": error | {"extra_info": {}}, "node_errors": node_errors})
    )
    with pytest.raises(RejectedError) as raised:
        ComfyUIProvider([fake.url], timeout=2).start(job())
    assert "No such file: 'x.safetensors'" in raised.value.message
    assert "/srv" not in raised.value.message


@pytest.mark.parametrize(
    ("text", "scrubbed"),
    [
        ("see http://gpu:8188/view/a/b.png", "see http://gpu:8188/view/a/b.png"),
        ("ratio 1/2/3 on 2024/01/02", "ratio 1/2/3 on 2024/01/02"),
        ("relative models/x.pt stays", "relative models/x.pt stays"),
        ("in (/opt/comfy/custom_nodes/n.py)", "in (n.py)"),
        ("D:/data/m.ckpt, E:\\z\\n.pt", "m.ckpt, n.pt"),
    ],
)
def test_scrub_paths_leaves_what_is_not_a_host_path(text, scrubbed):
    assert scrub_paths(text) == scrubbed


def test_cancel_interrupts_the_running_prompt_by_id(fake):
    fake.config["hold"] = True
    provider = ComfyUIProvider([fake.url], timeout=2)
    request = job(workflow=SMOKE)
    pending = provider.start(request)
    wait_until(lambda: fake.running is not None)
    assert provider.check(request, pending.remote_id).status == "running"
    provider.cancel(request, pending.remote_id)
    assert fake.interrupted == [JOB]
    finished(fake, JOB)
    with pytest.raises(RejectedError, match="interrupted"):
        provider.check(request, pending.remote_id)


def test_cancel_deletes_a_pending_prompt_without_interrupting_others(fake):
    fake.config.update(paused=True)
    provider = ComfyUIProvider([fake.url], timeout=2)
    request = job(workflow=SMOKE)
    pending = provider.start(request)
    provider.cancel(request, pending.remote_id)
    assert fake.pending == []
    assert fake.interrupted == []
    with pytest.raises(RejectedError, match="does not know"):
        provider.check(request, pending.remote_id)


# Progress over the websocket (API-NOTES 6.7) ------------------------------------------------


def progress_job(workflow=SMOKE, **settings) -> GenerationRequest:
    # Listeners are per job (its clientId): a job of its own per test.
    return job(job_id=str(uuid.uuid4()), workflow=workflow, **settings)


def poll(provider, request, remote_id, during=None, seconds=8.0) -> tuple[list, Output]:
    """Every check() until the Output: (the progress of each Pending, the Output)."""
    seen: list[float | None] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = provider.check(request, remote_id)
        if isinstance(result, Output):
            return seen, result
        assert isinstance(result, Pending)
        assert result.remote_id == remote_id
        seen.append(result.progress)
        if during:
            during(seen)
        time.sleep(0.02)
    raise AssertionError(f"{remote_id} still pending")


def events(ws, prompt_id) -> list[tuple[str, object]]:
    """(type, node) of every message until the prompt's `executing` with node null."""
    seen: list[tuple[str, object]] = []
    while not seen or seen[-1] != ("executing", None):
        message = json.loads(ws.recv())
        assert message["data"]["prompt_id"] == prompt_id
        data = message["data"]
        if message["type"] == "progress_state":  # which nodes it covers, and their states
            seen.append(("progress_state", {n: s["state"] for n, s in data["nodes"].items()}))
        else:
            seen.append((message["type"], data.get("node")))
    return seen


def drain(ws) -> list[str]:
    """The types of the messages a socket has waiting."""
    ws.settimeout(0.2)
    kinds = []
    with contextlib.suppress(websocket.WebSocketTimeoutException):
        while True:
            kinds.append(json.loads(ws.recv())["type"])
    return kinds


def connect(fake, client_id):
    ws = websocket.create_connection(f"ws{fake.url[4:]}/api/ws?clientId={client_id}", timeout=2)
    assert json.loads(ws.recv())["type"] == "status"
    return ws


def test_the_fake_websocket_handshake_follows_rfc_6455():
    assert ws_accept("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # 1.3's example


def test_the_fake_websocket_sends_progress_state_to_all_and_the_rest_to_the_client(fake):
    ws = websocket.create_connection(f"ws{fake.url[4:]}/api/ws?clientId=abc", timeout=2)
    bystander = connect(fake, "xyz")
    try:
        assert json.loads(ws.recv()) == {
            "type": "status",
            "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "abc"},
        }
        assert post(fake, SMOKE, client_id="abc", prompt_id=JOB).ok
        assert events(ws, JOB) == [
            ("execution_start", None),
            ("execution_cached", None),
            ("progress_state", {"1": "running"}),
            ("executing", "1"),
            ("progress_state", {"1": "running"}),
            ("progress", "1"),
            ("progress_state", {"1": "finished"}),
            ("progress_state", {"1": "finished", "2": "running"}),
            ("executing", "2"),
            ("executed", "2"),
            ("progress_state", {"1": "finished", "2": "finished"}),
            ("execution_success", None),
            ("executing", None),
        ]
        assert set(drain(bystander)) == {"progress_state"}
    finally:
        ws.close()
        bystander.close()
    assert fake.ws_clients == ["abc", "xyz"]


@pytest.mark.parametrize("ending", ["execution_error", "execution_interrupted"])
def test_the_fake_sends_executing_null_after_failed_prompts_too(fake, ending):
    fake.config.update(error="boom" if ending == "execution_error" else None, hold=True)
    ws = connect(fake, "abc")
    try:
        assert post(fake, SMOKE, client_id="abc", prompt_id=JOB).ok
        if ending == "execution_interrupted":
            wait_until(lambda: fake.running is not None)
            requests.post(f"{fake.url}/interrupt", json={"prompt_id": JOB}, timeout=2)
        else:
            fake.config["hold"] = False
        kinds = [kind for kind, _ in events(ws, JOB)]
        assert kinds[-2:] == [ending, "executing"]
        assert "execution_success" not in kinds
    finally:
        ws.close()


def test_the_fake_tells_a_reconnecting_client_which_node_runs(fake):
    fake.config["hold"] = True
    fake.enqueue(SMOKE, JOB, client_id="abc")
    wait_until(lambda: fake.running is not None)
    ws = connect(fake, "abc")
    try:
        assert json.loads(ws.recv()) == {"type": "executing", "data": {"node": "1"}}
    finally:
        ws.close()
        fake.config["hold"] = False


def test_check_reports_websocket_progress_while_the_prompt_runs(fake):
    fake.config["run_seconds"] = 1.0
    provider = ComfyUIProvider([fake.url], timeout=2)
    request = progress_job()
    pending = provider.start(request)
    seen, out = poll(provider, request, pending.remote_id)
    values = [p for p in seen if p is not None]
    assert any(0 < p < 1 for p in values), seen
    assert values == sorted(values)
    assert all(0 <= p <= 1 for p in values)
    assert png_size(out.data) == (64, 32)
    # ComfyUI sends progress only to the socket of the clientId the prompt was sent with.
    client_id = client_id_for(request.job_id)
    assert prompts_for(fake, prompt_id_for(request.job_id))[0].json()["client_id"] == client_id
    assert fake.ws_clients == [client_id]
    wait_until(lambda: client_id not in fake.sockets)  # the finished job's listener closed


def test_progress_covers_the_whole_graph_and_never_goes_back(fake):
    fake.config["run_seconds"] = 1.0
    graph = sdxl_text_to_image("a fox", steps=10)
    graph["10"] = {"class_type": "KSampler", "inputs": {**graph["3"]["inputs"]}}
    graph["10"]["inputs"]["latent_image"] = ["3", 0]  # a second sampler, refining the first
    graph["8"]["inputs"]["samples"] = ["10", 0]
    provider = ComfyUIProvider([fake.url], timeout=2)
    request = progress_job(graph)
    seen, _ = poll(provider, request, provider.start(request).remote_id)
    values = [p for p in seen if p is not None]
    assert values == sorted(values), seen
    assert any(0.4 < p < 0.6 for p in values), seen  # 4 of 8 nodes before the samplers run
    assert any(0.6 < p < 0.8 for p in values), seen  # the second sampler moves it on


def test_a_graph_without_a_sampler_still_moves(fake):
    fake.config["run_seconds"] = 0.6
    graph = smoke(**{"3": PREVIEW, "4": {**PREVIEW, "inputs": {"images": ["1", 0]}}})
    provider = ComfyUIProvider([fake.url], timeout=2)
    request = progress_job(graph)
    seen, _ = poll(provider, request, provider.start(request).remote_id)
    assert any(p is not None and 0 < p < 1 for p in seen), seen


def test_progress_of_a_failed_prompt_never_reads_as_done(fake):
    fake.config.update(run_seconds=0.5, error="boom")
    provider = ComfyUIProvider([fake.url], timeout=2)
    request = progress_job()
    pending = provider.start(request)
    seen = []
    with pytest.raises(RejectedError, match="boom"):
        poll(provider, request, pending.remote_id, during=lambda s: seen.extend(s[-1:]))
    assert all(p is None or p < 1 for p in seen), seen


def test_a_restarted_worker_hears_the_rest_of_the_progress(fake):
    fake.config["run_seconds"] = 2.0
    request = progress_job()
    client_id = client_id_for(request.job_id)
    first = ComfyUIProvider([fake.url], timeout=2)
    pending = first.start(request)
    reported: list[float] = []

    def under_way() -> bool:
        reported.append(first.check(request, pending.remote_id).progress or 0)
        return reported[-1] > 0.1

    wait_until(under_way)
    comfyui_progress.close_all()  # the worker process dies with its listeners
    wait_until(lambda: client_id not in fake.sockets)
    restarted = ComfyUIProvider([fake.url], timeout=2)
    seen, out = poll(restarted, request, pending.remote_id)
    heard = [p for p in seen if p is not None]
    assert heard, seen
    assert max(heard) > reported[-1] + 0.1, (reported, seen)  # later steps reached it
    assert png_size(out.data) == (64, 32)
    assert fake.ws_clients == [client_id, client_id]
    assert len(fake.received("prompt")) == 1


def test_cancel_closes_the_jobs_listener(fake):
    fake.config["hold"] = True
    provider = ComfyUIProvider([fake.url], timeout=2)
    request = progress_job()
    pending = provider.start(request)
    client_id = client_id_for(request.job_id)
    wait_until(lambda: client_id in fake.sockets)
    provider.cancel(request, pending.remote_id)
    wait_until(lambda: client_id not in fake.sockets)


def test_without_a_websocket_progress_is_none_and_polling_still_works(fake):
    fake.config.update(run_seconds=0.5, websocket=False)
    assert requests.get(f"{fake.url}/ws", timeout=2).status_code == 404
    provider = ComfyUIProvider([fake.url], timeout=2)
    request = progress_job()
    pending = provider.start(request)
    seen, out = poll(provider, request, pending.remote_id)
    assert seen
    assert set(seen) == {None}
    assert png_size(out.data) == (64, 32)
    assert fake.ws_clients == []


@pytest.mark.parametrize("comes_back", [True, False])
def test_a_websocket_dropped_mid_run_does_not_break_check(fake, comes_back):
    fake.config["run_seconds"] = 1.5
    provider = ComfyUIProvider([fake.url], timeout=2)
    request = progress_job()
    client_id = client_id_for(request.job_id)
    pending = provider.start(request)
    dropped_at: list[float] = []

    def drop_once(seen):
        if not dropped_at and seen[-1] is not None and seen[-1] < 0.25:
            fake.config["websocket"] = comes_back
            assert fake.drop_websockets() == 1
            dropped_at.append(seen[-1])

    seen, out = poll(provider, request, pending.remote_id, during=drop_once)
    assert dropped_at, seen
    assert png_size(out.data) == (64, 32)
    after = [p for p in seen[seen.index(dropped_at[0]) :] if p is not None]
    if comes_back:  # the listener reconnected (same clientId) and progress went on
        assert fake.ws_clients == [client_id, client_id]
        assert max(after) > dropped_at[0]
    else:  # the last value heard stays (at most one step was in flight); polling finished it
        assert fake.ws_clients == [client_id]
        assert None not in after
        assert max(after) < dropped_at[0] + 0.1  # 15 steps over half the graph: never near 1


def state(**nodes) -> dict:
    """A progress_state message's data: node id -> (state, value, max)."""
    return {
        "prompt_id": "p",
        "nodes": {n: {"state": s, "value": v, "max": m} for n, (s, v, m) in nodes.items()},
    }


def test_prompt_progress_reads_the_whole_graph_and_only_success_as_done():
    progress, graph = PromptProgress(), {"1", "2", "3", "4"}
    assert progress.fraction(graph) is None
    progress.hear("progress_state", state(**{"1": ("finished", 1, 1), "2": ("running", 5, 10)}))
    assert progress.fraction(graph) == pytest.approx(1.5 / 4)
    progress.hear("progress", {"value": 1, "max": 10})  # a second sampler starts over
    progress.hear("progress_state", state(**{"1": ("finished", 1, 1), "2": ("running", 1, 10)}))
    assert progress.fraction(graph) == pytest.approx(1.5 / 4)  # never back
    progress.hear("execution_error", {})
    progress.hear("executing", {"node": None})
    assert progress.fraction(graph) == pytest.approx(1.5 / 4)
    progress.hear("execution_success", {})
    assert progress.fraction(graph) == 1.0


def test_prompt_progress_falls_back_to_progress_messages_of_older_servers():
    progress = PromptProgress()
    progress.hear("progress", {"value": 3, "max": 4})
    assert progress.fraction({"1", "2"}) == 0.75
    progress.hear("progress", {"value": 1, "max": 4})
    assert progress.fraction({"1", "2"}) == 0.75


def test_websocket_urls_follow_the_instance_url():
    assert ws_url("http://gpu1:8188", "c1") == "ws://gpu1:8188/ws?clientId=c1"
    assert ws_url("https://gpu1/api/", "a b") == "wss://gpu1/api/ws?clientId=a+b"
    assert client_id_for("job-7") == f"pipeline-{prompt_id_for('job-7')}"
