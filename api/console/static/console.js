// The web console: submit, watch, list, wallet and admin, over this origin's /v1 API.
//
// The API key lives in sessionStorage (this tab only) and travels only in the
// Authorization header of fetch() calls to /v1: never in a URL, never logged. Live
// status is read from GET /v1/jobs/<id>/events with fetch() and a stream reader,
// because EventSource cannot send that header; polling is the fallback when the
// stream is not offered. Everything is drawn with DOM calls (no innerHTML), so text
// from the API is never read as markup. "Retry" resubmits a job's own `input` (prompt,
// settings, a provider the caller named), as GET /v1/jobs/<id> shows it: any finished
// job can be retried, wherever it was submitted.
"use strict";

(function () {
  const KEY_SLOT = "pipeline.console.key";
  const CONTENT_TYPES = ["text", "image", "audio", "video"];
  const STATUSES = ["pending", "queued", "processing", "completed", "failed", "cancelled"];
  const TERMINAL = new Set(["completed", "failed", "cancelled"]);
  const KEYED_PROVIDERS = ["openai", "stability", "elevenlabs", "runway", "heygen"];
  const POLL_MS = 1500;
  const STREAM_TRIES = 5;
  const PALETTE = ["#0b57d0", "#b3261e", "#146c2e", "#8a4b00", "#6b3fa0", "#00696f", "#5b6470"];
  // Words for the codes a person meets most; the API's own message follows them.
  const CODE_WORDS = {
    UNAUTHORIZED: "The API key was not accepted.",
    FORBIDDEN: "This key is not allowed to do that.",
    INSUFFICIENT_CREDITS: "The wallet does not hold enough credits for this job.",
    BUDGET_EXCEEDED: "A budget would be exceeded.",
    VALIDATION_ERROR: "Something in the request is not valid.",
    PROVIDER_NOT_CONFIGURED: "That provider is not set up for this company.",
    PROVIDER_UNAVAILABLE: "Every provider for this content type is cooling down.",
    JOB_NOT_FOUND: "No such job.",
    JOB_ALREADY_FINISHED: "The job has already ended.",
    RATE_LIMITED: "Too many requests for now.",
    NETWORK_ERROR: "The server could not be reached.",
    CANCELLED: "The job was cancelled.",
  };

  const state = {
    key: null,
    admin: false,
    providers: [],
    sessionCards: null, // the Create page's cards, kept while the page is away
    jobsPages: [], // cursors of the pages seen, for "Newer"
  };

  // ---- DOM ----------------------------------------------------------------------

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
      else if (name === "text") el.textContent = value;
      else if (value === true) el.setAttribute(name, "");
      else el.setAttribute(name, String(value));
    }
    append(el, children);
    return el;
  }

  function append(el, children) {
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }

  const SVG_NS = "http://www.w3.org/2000/svg";
  function svg(tag, attrs, ...children) {
    const el = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (name === "text") el.textContent = value;
      else el.setAttribute(name, String(value));
    }
    for (const child of children.flat()) if (child) el.append(child);
    return el;
  }

  let uid = 0;
  const nextId = (prefix) => `${prefix}-${++uid}`;

  function field(labelText, control, hint) {
    const id = control.id || nextId("f");
    control.id = id;
    const hintEl = hint ? h("span", { class: "hint", id: `${id}-hint`, text: hint }) : null;
    if (hintEl) control.setAttribute("aria-describedby", hintEl.id);
    return h("div", { class: "field" }, h("label", { for: id, text: labelText }), control, hintEl);
  }

  function select(name, options, value) {
    const el = h("select", { name });
    for (const [optionValue, label] of options) {
      el.append(h("option", { value: optionValue, selected: optionValue === value, text: label }));
    }
    return el;
  }

  function announce(text) {
    const region = document.getElementById("announce");
    region.textContent = "";
    window.setTimeout(() => { region.textContent = text; }, 50);
  }

  const sleep = (ms) => new Promise((resolve) => window.setTimeout(resolve, ms));

  function credits(value) {
    if (value === null || value === undefined) return "—";
    const text = String(value);
    return text.includes(".") ? text.replace(/0+$/, "").replace(/\.$/, "") : text;
  }

  function when(iso) {
    if (!iso) return "—";
    const date = new Date(iso);
    return Number.isNaN(date.getTime()) ? iso : date.toLocaleString();
  }

  // A table that reads on a phone: each cell carries its column's name, which the style
  // sheet shows beside it when the rows are stacked on a narrow screen.
  function stackable(table, label) {
    const names = [...table.querySelectorAll("thead th")].map((th) => th.textContent);
    for (const row of table.querySelectorAll("tbody tr")) {
      [...row.children].forEach((cell, i) => { if (names[i]) cell.dataset.label = names[i]; });
    }
    table.classList.add("stacked");
    return h("div", { class: "table-scroll", role: "region", tabindex: 0, "aria-label": label }, table);
  }

  // ---- The API ------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, message, details) {
      super(message);
      this.status = status;
      this.code = code;
      this.details = details || {};
    }
  }

  function authHeaders(extra) {
    return { Authorization: `Bearer ${state.key}`, ...(extra || {}) };
  }

  async function errorFrom(response) {
    let body = null;
    try { body = await response.json(); } catch (_) { body = null; }
    if (body && typeof body.code === "string") {
      return new ApiError(response.status, body.code, body.error || response.statusText, body.details);
    }
    return new ApiError(response.status, `HTTP_${response.status}`, response.statusText || "Request failed.");
  }

  async function api(method, path, body) {
    const headers = authHeaders({ Accept: "application/json" });
    const init = { method, headers, cache: "no-store", credentials: "omit" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (_) {
      throw new ApiError(0, "NETWORK_ERROR", "The request did not reach the server.");
    }
    if (!response.ok) throw await errorFrom(response);
    return response.status === 204 ? null : response.json();
  }

  function describeError(err) {
    if (!(err instanceof ApiError)) return `Unexpected error: ${err && err.message ? err.message : err}`;
    const words = CODE_WORDS[err.code];
    const field = err.details && err.details.field ? ` (field: ${err.details.field})` : "";
    const message = words && words !== err.message ? `${words} ${err.message}` : err.message;
    return `${message}${field} — code ${err.code}${err.status ? `, HTTP ${err.status}` : ""}`;
  }

  function showError(box, err) {
    box.textContent = err ? describeError(err) : "";
    if (err) box.dataset.code = err.code || "";
    else delete box.dataset.code;
  }

  // Result links of local storage are this server's /v1/files/...: shown from here.
  // Links to an object store are another origin, which this page never loads from.
  function localLink(url) {
    if (!url) return null;
    try {
      const parsed = new URL(url, window.location.origin);
      if (parsed.origin === window.location.origin || parsed.pathname.startsWith("/v1/files/")) {
        return parsed.pathname + parsed.search;
      }
    } catch (_) { /* not a URL */ }
    return null;
  }

  // ---- Live status ------------------------------------------------------------------

  // Server-Sent Events, read from a fetch() body: `field: value` lines, a blank line
  // ends an event; `id` is kept for Last-Event-ID, `retry` for the reconnect delay.
  function sseParser(onEvent, onRetry) {
    let buffer = "";
    let event = { type: "", data: [], id: null };
    return function feed(text) {
      buffer += text;
      const lines = buffer.split(/\r\n|\r|\n/);
      buffer = lines.pop();
      for (const line of lines) {
        if (line === "") {
          if (event.data.length) onEvent(event.type || "message", event.data.join("\n"), event.id);
          event = { type: "", data: [], id: null };
          continue;
        }
        if (line.startsWith(":")) continue; // a comment: the keep-alive
        const colon = line.indexOf(":");
        const name = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? "" : line.slice(colon + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (name === "event") event.type = value;
        else if (name === "data") event.data.push(value);
        else if (name === "id" && !value.includes("\0")) event.id = value;
        else if (name === "retry" && /^\d+$/.test(value)) onRetry(Number(value));
      }
    };
  }

  // Watches a job until it ends: onJob(job) for each change, onError(err) when it cannot.
  function watch(jobId, onJob, onError) {
    const ctl = { stopped: false, lastEventId: null, retryMs: 2000, abort: null, mode: "stream" };
    ctl.stop = () => {
      ctl.stopped = true;
      if (ctl.abort) ctl.abort.abort();
    };
    (async () => {
      let failures = 0;
      while (!ctl.stopped) {
        const outcome = await streamOnce(jobId, ctl, onJob, onError);
        if (outcome === "done" || outcome === "gone") return;
        if (outcome === "progressed") failures = 0;
        else failures += 1;
        if (outcome === "unsupported" || failures >= STREAM_TRIES) break;
        await sleep(ctl.retryMs);
      }
      if (!ctl.stopped) await poll(jobId, ctl, onJob, onError);
    })();
    return ctl;
  }

  async function streamOnce(jobId, ctl, onJob, onError) {
    ctl.abort = new AbortController();
    const headers = authHeaders({ Accept: "text/event-stream" });
    if (ctl.lastEventId) headers["Last-Event-ID"] = ctl.lastEventId;
    let response;
    try {
      response = await fetch(`/v1/jobs/${encodeURIComponent(jobId)}/events`, {
        headers, cache: "no-store", credentials: "omit", signal: ctl.abort.signal });
    } catch (_) {
      return ctl.stopped ? "done" : "failed";
    }
    if (!response.ok) {
      const err = await errorFrom(response);
      if (err.code === "JOB_NOT_FOUND" || err.code === "UNAUTHORIZED") {
        onError(err);
        return "gone";
      }
      return err.status === 429 || err.status >= 500 ? "failed" : "unsupported";
    }
    if (!(response.headers.get("Content-Type") || "").startsWith("text/event-stream")) {
      return "unsupported";
    }
    ctl.mode = "stream";
    let ended = false;
    let seen = false;
    const feed = sseParser((type, data, id) => {
      if (id !== null) ctl.lastEventId = id;
      let job;
      try { job = JSON.parse(data); } catch (_) { return; }
      seen = true;
      onJob(job, type);
      if (TERMINAL.has(type) || TERMINAL.has(job.status)) ended = true;
    }, (ms) => { ctl.retryMs = ms; });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    try {
      while (!ended) {
        const { value, done } = await reader.read();
        if (done) break;
        feed(decoder.decode(value, { stream: true }));
      }
    } catch (_) {
      if (ctl.stopped) return "done";
    }
    if (ended) {
      ctl.abort.abort();
      return "done";
    }
    return seen ? "progressed" : "failed";
  }

  async function poll(jobId, ctl, onJob, onError) {
    ctl.mode = "poll";
    let last = "";
    while (!ctl.stopped) {
      try {
        const job = await api("GET", `/v1/jobs/${encodeURIComponent(jobId)}`);
        const seen = JSON.stringify([job.status, job.progress, job.actualCost, job.queuePosition, job.attempts]);
        if (seen !== last) onJob(job, job.status);
        last = seen;
        if (TERMINAL.has(job.status)) return;
      } catch (err) {
        if (err.status === 404 || err.status === 401) {
          onError(err);
          return;
        }
      }
      await sleep(POLL_MS);
    }
  }

  // ---- A job's card ------------------------------------------------------------------

  const OUTCOME_WORDS = {
    succeeded: "succeeded",
    transient: "failed for now (retried)",
    failed: "refused",
    timeout: "timed out",
    abandoned: "stopped (the job ended)",
  };

  function clock(iso) {
    const date = new Date(iso);
    return Number.isNaN(date.getTime()) ? iso : date.toLocaleTimeString();
  }

  // The card's attempt log, from GET /v1/jobs/<id>/attempts: read again whenever the
  // stream reports a new attempt or a new status, never more than one read at a time.
  function attemptLog(jobId) {
    const list = h("ol", { class: "attempts", "aria-label": "Attempt log" });
    const el = h("div", { class: "attempt-log", hidden: true },
      h("p", { class: "hint", text: "Attempt log" }), list);
    let seen = "";
    let reading = false;
    let again = false;
    let lateRead = false;
    let job = null;

    async function read() {
      if (reading) { again = true; return; }
      reading = true;
      try {
        const { attempts } = await api("GET", `/v1/jobs/${encodeURIComponent(jobId)}/attempts`);
        draw(attempts);
      } catch (_) {
        // The log is extra: the card still shows the job, and the next change reads again.
      } finally {
        reading = false;
        if (again) { again = false; read(); }
      }
    }

    function draw(attempts) {
      list.replaceChildren(...attempts.map(item));
      el.hidden = !attempts.length;
      // A cancelled job's attempt is closed by its worker a moment after the job ends.
      if (job && TERMINAL.has(job.status) && !lateRead && attempts.some((a) => !a.finishedAt)) {
        lateRead = true;
        window.setTimeout(read, 3000);
      }
    }

    function item(a) {
      const ended = job && TERMINAL.has(job.status);
      const outcome = a.outcome ? (OUTCOME_WORDS[a.outcome] || a.outcome) : (ended ? "no outcome recorded" : "running");
      const times = `started ${clock(a.startedAt)}${a.finishedAt ? `, ended ${clock(a.finishedAt)}` : ""}`;
      const error = a.error ? `${a.error.code || "ERROR"}${a.error.message ? `: ${a.error.message}` : ""}` : null;
      return h("li", { "data-outcome": a.outcome || "none", "data-provider": a.provider },
        h("span", { class: "attempt-head", text: `#${a.number} ${a.provider}: ${outcome}` }),
        h("span", { class: "hint", text: times }),
        error ? h("span", { class: "attempt-error", text: error }) : null);
    }

    function changed(next) {
      job = next;
      if (!job.attempts) return;
      const mark = `${job.attempts}|${job.status}`;
      if (mark === seen) return;
      seen = mark;
      read();
    }

    return { el, changed };
  }

  function jobCard(jobId, request, onRetry) {
    const titleId = nextId("job");
    const badge = h("span", { class: "badge pending", text: "submitted" });
    const cells = {};
    const row = (name, key) => {
      cells[key] = h("dd", { text: "—" });
      return [h("dt", { text: name }), cells[key]];
    };
    const progressLabel = nextId("progress");
    const progress = h("progress", { max: 1, "aria-labelledby": progressLabel });
    const progressText = h("span", { class: "hint", id: progressLabel, text: "Progress" });
    const errorBox = h("div", { class: "error", role: "alert" });
    const result = h("div", { class: "result" });
    const actions = h("div", { class: "row" });
    const title = h("h3", { id: titleId, text: request ? `${request.contentType} job` : "Job" });
    const promptLine = h("p", { class: "hint", hidden: true });
    const attempts = attemptLog(jobId);
    const el = h("article", { class: "card", "aria-labelledby": titleId, "data-job-id": jobId },
      h("header", {}, title, badge),
      h("p", { class: "id" }, "Job ", h("a", { href: `#/job/${jobId}`, text: jobId })),
      promptLine,
      h("dl", {}, row("Provider", "provider"), row("Estimated", "estimated"),
        row("Actual cost", "actual"), row("Attempts", "attempts"), row("In queue", "queue"),
        row("Updated by", "mode")),
      attempts.el,
      h("div", {}, progressText, progress),
      errorBox, result, actions);

    let job = null;
    let shown = false;
    let watcher = null;

    const cancel = h("button", { type: "button", class: "danger", text: "Cancel", onclick: async () => {
      cancel.disabled = true;
      try {
        update(await api("POST", `/v1/jobs/${encodeURIComponent(jobId)}/cancel`));
        announce("Job cancelled.");
      } catch (err) {
        showError(errorBox, err);
        cancel.disabled = false;
      }
    } });
    // What was asked for: the form's request on this page, else the job's own input.
    const given = () => request || (job && job.input) || null;
    const retry = h("button", { type: "button", class: "quiet", text: "Retry with the same settings",
      onclick: () => onRetry(given()) });
    append(actions, [cancel]);

    function update(next) {
      job = next;
      const status = job.status || "pending";
      if (promptLine.hidden && given()) {
        promptLine.textContent = `“${given().prompt.slice(0, 140)}”`;
        promptLine.hidden = false;
      }
      attempts.changed(job);
      el.dataset.status = status;
      badge.className = `badge ${status}`;
      badge.textContent = status;
      if (!request) title.textContent = `${job.contentType} job`;
      cells.provider.textContent = job.provider || "—";
      cells.estimated.textContent = credits(job.estimatedCost);
      cells.actual.textContent = credits(job.actualCost);
      cells.attempts.textContent = job.attempts ?? "—";
      cells.queue.textContent = job.queuePosition ? `#${job.queuePosition}` : "—";
      cells.mode.textContent = watcher ? (watcher.mode === "poll" ? "polling" : "live stream") : "—";
      if (TERMINAL.has(status)) {
        progress.value = status === "completed" ? 1 : (job.progress || 0);
        progressText.textContent = status === "completed" ? "Progress: done" : "Progress: stopped";
        cancel.remove();
        if (given() && !retry.isConnected) actions.append(retry);
      } else if (typeof job.progress === "number") {
        progress.value = job.progress;
        progressText.textContent = `Progress: ${Math.round(job.progress * 100)}%`;
      } else {
        progress.removeAttribute("value"); // indeterminate
        progressText.textContent = `Progress: ${status}`;
      }
      if (job.error) {
        const words = CODE_WORDS[job.error.code];
        errorBox.textContent = `${words ? `${words} ` : ""}${job.error.message} — code ${job.error.code}`;
        errorBox.dataset.code = job.error.code;
      }
      if (status === "completed" && job.result && !shown) {
        shown = true;
        showResult(result, job, given(), actions);
      }
    }

    function follow() {
      if (job && TERMINAL.has(job.status)) return;
      watcher = watch(jobId, update, (err) => showError(errorBox, err));
    }

    return { el, update, follow, stop: () => watcher && watcher.stop() };
  }

  function showResult(box, job, request, actions) {
    const url = localLink(job.result.url);
    const kind = job.contentType;
    const what = request ? request.prompt.slice(0, 120) : `job ${job.jobId}`;
    if (!url) {
      box.append(h("p", { class: "hint", text: "The result is kept by the object store, " +
        "another origin this page does not load from: open it with the link below." }));
      actions.prepend(h("a", { href: job.result.url, rel: "noopener noreferrer", text: "Download" }));
      return;
    }
    if (kind === "image") {
      box.append(h("img", { src: url, alt: `Generated image: ${what}` }));
    } else if (kind === "audio") {
      box.append(h("audio", { src: url, controls: true, preload: "metadata",
        "aria-label": `Generated audio: ${what}` }));
    } else if (kind === "video") {
      box.append(h("video", { src: url, controls: true, preload: "metadata", playsinline: true,
        "aria-label": `Generated video: ${what}` }));
    } else {
      const pre = h("pre", { tabindex: 0, "aria-label": "Generated text", text: "Loading…" });
      box.append(pre);
      fetch(url, { cache: "no-store", credentials: "omit" })
        .then((r) => (r.ok ? r.text() : Promise.reject(new Error(`HTTP ${r.status}`))))
        .then((text) => { pre.textContent = text; })
        .catch((err) => { pre.textContent = `Could not load the text: ${err.message}`; });
    }
    const name = `${job.jobId}${extensionOf(job.result.contentType)}`;
    actions.prepend(h("a", { href: url, download: name, text: `Download (${job.result.contentType}, ${job.result.size} bytes)` }));
  }

  function extensionOf(mime) {
    const known = { "image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp",
      "audio/wav": ".wav", "audio/x-wav": ".wav", "audio/mpeg": ".mp3", "video/mp4": ".mp4",
      "text/plain": ".txt" };
    return known[(mime || "").split(";")[0]] || "";
  }

  // ---- Create ------------------------------------------------------------------------

  async function loadProviders() {
    try {
      state.providers = (await api("GET", "/v1/providers")).providers;
    } catch (_) {
      state.providers = [];
    }
  }

  function settingControl(setting) {
    const name = `setting.${setting.name}`;
    let control;
    if (setting.enum) {
      control = select(name, [["", `default (${setting.default ?? "provider's"})`],
        ...setting.enum.map((v) => [v, v])], "");
    } else if (setting.type === "object") {
      control = h("textarea", { name, class: "code", rows: 4, spellcheck: "false" });
    } else if (setting.type === "integer" || setting.type === "number") {
      control = h("input", { name, type: "number", inputmode: setting.type === "integer" ? "numeric" : "decimal",
        min: setting.minimum, max: setting.maximum, step: setting.type === "integer" ? 1 : "any",
        placeholder: setting.default ?? "" });
    } else {
      control = h("input", { name, type: "text", placeholder: setting.default ?? "" });
    }
    control.dataset.setting = setting.name;
    control.dataset.type = setting.type;
    const range = setting.minimum !== undefined && setting.maximum !== undefined
      ? `${setting.minimum}–${setting.maximum}` : "";
    const hint = [setting.description, range, setting.default !== null && setting.default !== undefined
      ? `default ${setting.default}` : ""].filter(Boolean).join("; ");
    return field(setting.name, control, hint);
  }

  function readSettings(form) {
    const settings = {};
    for (const control of form.querySelectorAll("[data-setting]")) {
      const raw = control.value.trim();
      if (!raw) continue;
      const type = control.dataset.type;
      if (type === "integer" || type === "number") settings[control.dataset.setting] = Number(raw);
      else if (type === "object") settings[control.dataset.setting] = parseJson(raw, control.dataset.setting);
      else settings[control.dataset.setting] = raw;
    }
    const rawJson = form.elements.rawSettings.value.trim();
    if (rawJson) {
      const extra = parseJson(rawJson, "settings as JSON");
      if (!extra || typeof extra !== "object" || Array.isArray(extra)) {
        throw new ApiError(0, "VALIDATION_ERROR", "Settings as JSON must be an object: {...}.");
      }
      Object.assign(settings, extra);
    }
    return settings;
  }

  function parseJson(text, what) {
    try {
      return JSON.parse(text);
    } catch (err) {
      throw new ApiError(0, "VALIDATION_ERROR", `${what} is not valid JSON: ${err.message}`);
    }
  }

  async function renderCreate(view) {
    if (!state.providers.length) await loadProviders();
    if (!state.sessionCards) state.sessionCards = h("div", { class: "cards", id: "session-jobs" });
    const kind = select("contentType", CONTENT_TYPES.map((t) => [t, t]), "image");
    const provider = h("select", { name: "provider" });
    const settingsBox = h("fieldset", {}, h("legend", { text: "Settings" }));
    const prompt = h("textarea", { name: "prompt", rows: 3, required: true, maxlength: 4000 });
    const rawSettings = h("textarea", { name: "rawSettings", class: "code", rows: 6, spellcheck: "false",
      placeholder: '{"workflow": {...}}' });
    const errorBox = h("div", { class: "error", role: "alert", id: "submit-error" });

    const drawProviders = () => {
      const chosen = provider.value;
      provider.replaceChildren(h("option", { value: "", text: "Automatic (routing)" }));
      for (const p of state.providers.filter((p) => p.contentTypes.includes(kind.value))) {
        provider.append(h("option", { value: p.name, disabled: !p.configured, selected: p.name === chosen,
          text: p.configured ? p.name : `${p.name} (not configured)` }));
      }
      drawSettings();
    };
    const drawSettings = () => {
      settingsBox.replaceChildren(h("legend", { text: "Settings" }));
      const chosen = state.providers.find((p) => p.name === provider.value);
      const listed = chosen ? (chosen.settings[kind.value] || []) : [];
      if (!listed.length) {
        settingsBox.append(h("p", { class: "hint", text: chosen
          ? "This provider lists no settings for this type: use settings as JSON below."
          : "Choose a provider to see its settings; routing uses each provider's defaults." }));
      }
      settingsBox.append(h("div", { class: "grid" }, listed.map(settingControl)));
    };
    kind.addEventListener("change", drawProviders);
    provider.addEventListener("change", drawSettings);

    const form = h("form", { class: "stack", id: "submit-form", novalidate: true },
      h("div", { class: "grid" }, field("Content type", kind), field("Provider", provider)),
      field("Prompt", prompt, "What to generate"),
      settingsBox,
      h("details", {}, h("summary", { text: "Settings as JSON (ComfyUI workflows and anything else)" }),
        field("Settings as JSON", rawSettings, "An object merged over the fields above, sent as `settings`")),
      h("div", { class: "row" }, h("button", { type: "submit", text: "Submit job" })),
      errorBox);
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      showError(errorBox, null);
      const button = form.querySelector("button[type=submit]");
      try {
        const request = { contentType: kind.value, prompt: prompt.value, settings: readSettings(form) };
        if (provider.value) request.provider = provider.value;
        button.disabled = true;
        await submitJob(request);
      } catch (err) {
        showError(errorBox, err);
        (form.querySelector(`[name="setting.${err.details && err.details.field}"]`) || prompt).focus();
      } finally {
        button.disabled = false;
      }
    });
    drawProviders();
    const local = state.providers.find((p) => p.name === "local" && p.configured);
    if (local) { provider.value = "local"; drawSettings(); }
    view.append(h("section", { "aria-labelledby": "create-title" },
      h("h1", { id: "create-title", tabindex: -1, text: "Create" }), form));
    view.append(h("section", { "aria-labelledby": "session-title" },
      h("h2", { id: "session-title", text: "Jobs submitted here" }),
      state.sessionCards.children.length ? null : h("p", { class: "hint", id: "session-empty",
        text: "Jobs you submit appear here and update live." }),
      state.sessionCards));
  }

  async function submitJob(request) {
    const accepted = await api("POST", "/v1/jobs", request);
    const card = jobCard(accepted.jobId, request, (again) => submitJob(again).catch((err) => {
      const box = document.getElementById("submit-error");
      if (box) showError(box, err);
    }));
    card.update({ jobId: accepted.jobId, status: accepted.status, contentType: request.contentType,
      estimatedCost: accepted.estimatedCost, provider: request.provider || "" });
    if (!state.sessionCards) state.sessionCards = h("div", { class: "cards", id: "session-jobs" });
    state.sessionCards.prepend(card.el);
    const empty = document.getElementById("session-empty");
    if (empty) empty.remove();
    card.follow();
    announce(`Job submitted: ${request.contentType}, estimated ${credits(accepted.estimatedCost)} credits.`);
    return accepted;
  }

  // ---- One job -------------------------------------------------------------------------

  async function renderJob(view, jobId) {
    const heading = h("h1", { tabindex: -1, text: "Job" });
    const section = h("section", { "aria-labelledby": "job-title" }, heading);
    heading.id = "job-title";
    view.append(section);
    try {
      const job = await api("GET", `/v1/jobs/${encodeURIComponent(jobId)}`);
      const card = jobCard(jobId, null, (again) => submitJob(again).then(() => { window.location.hash = "#/submit"; }));
      card.update(job);
      section.append(card.el);
      card.follow();
      currentStops.push(card.stop);
    } catch (err) {
      const box = h("div", { class: "error", role: "alert" });
      showError(box, err);
      section.append(box);
    }
  }

  // ---- Jobs --------------------------------------------------------------------------

  async function renderJobs(view) {
    if (!state.providers.length) await loadProviders();
    const status = select("status", [["", "any"], ...STATUSES.map((s) => [s, s])], "");
    const kind = select("contentType", [["", "any"], ...CONTENT_TYPES.map((t) => [t, t])], "");
    const provider = select("provider", [["", "any"], ...state.providers.map((p) => [p.name, p.name])], "");
    const body = h("div", { "aria-live": "polite" });
    const newer = h("button", { type: "button", class: "quiet", text: "Newer" });
    const older = h("button", { type: "button", class: "quiet", text: "Older" });
    const pageLabel = h("span", { class: "hint" });
    const errorBox = h("div", { class: "error", role: "alert" });
    let pages = [null];

    const load = async (cursor) => {
      showError(errorBox, null);
      const query = new URLSearchParams({ limit: "20" });
      if (status.value) query.set("status", status.value);
      if (kind.value) query.set("contentType", kind.value);
      if (provider.value) query.set("provider", provider.value);
      if (cursor) query.set("cursor", cursor);
      try {
        const page = await api("GET", `/v1/jobs?${query}`);
        body.replaceChildren(jobsTable(page.jobs, retry));
        older.disabled = !page.nextCursor;
        older.dataset.cursor = page.nextCursor || "";
        newer.disabled = pages.length <= 1;
        pageLabel.textContent = `Page ${pages.length}`;
      } catch (err) {
        showError(errorBox, err);
      }
    };
    const restart = () => { pages = [null]; load(null); };
    // The new job's card is on the Create page, where it is followed live.
    const retry = async (input, button) => {
      showError(errorBox, null);
      button.disabled = true;
      try {
        await submitJob(input);
        window.location.hash = "#/submit";
      } catch (err) {
        showError(errorBox, err);
        button.disabled = false;
      }
    };
    for (const control of [status, kind, provider]) control.addEventListener("change", restart);
    older.addEventListener("click", () => { pages.push(older.dataset.cursor); load(older.dataset.cursor); });
    newer.addEventListener("click", () => { pages.pop(); load(pages[pages.length - 1]); });
    const refresh = h("button", { type: "button", class: "quiet", text: "Refresh",
      onclick: () => load(pages[pages.length - 1]) });

    view.append(h("section", { "aria-labelledby": "jobs-title" },
      h("h1", { id: "jobs-title", tabindex: -1, text: "Jobs" }),
      h("form", { class: "grid", role: "search", "aria-label": "Filter jobs", onsubmit: (e) => e.preventDefault() },
        field("Status", status), field("Content type", kind), field("Provider", provider)),
      errorBox, body,
      h("div", { class: "row" }, newer, older, refresh, pageLabel)));
    await load(null);
  }

  function jobsTable(jobs, onRetry) {
    if (!jobs.length) return h("p", { text: "No jobs match." });
    const rows = jobs.map((job) => {
      const link = job.status === "completed" && job.contentType === "image" && job.result
        ? localLink(job.result.url) : null;
      const thumb = link ? h("img", { class: "thumb", src: link, alt: "", loading: "lazy" }) : null;
      return h("tr", { "data-job-id": job.jobId, "data-status": job.status },
        h("td", {}, thumb),
        h("td", {}, h("a", { href: `#/job/${job.jobId}`, text: job.jobId.slice(0, 8),
          "aria-label": `Job ${job.jobId}` })),
        h("td", { text: job.contentType }),
        h("td", { text: job.provider }),
        h("td", {}, h("span", { class: `badge ${job.status}`, text: job.status })),
        h("td", { class: "num", text: credits(job.estimatedCost) }),
        h("td", { class: "num", text: credits(job.actualCost) }),
        h("td", { text: when(job.createdAt) }),
        h("td", {}, TERMINAL.has(job.status) && job.input ? h("button", { type: "button", class: "quiet",
          text: "Retry", "aria-label": `Retry job ${job.jobId} with the same settings`,
          onclick: (event) => onRetry(job.input, event.currentTarget) }) : null));
    });
    const head = ["Preview", "Job", "Type", "Provider", "Status", "Estimated", "Actual", "Created", "Actions"];
    return stackable(h("table", {},
      h("caption", { class: "visually-hidden", text: "Jobs, newest first" }),
      h("thead", {}, h("tr", {}, head.map((name) => h("th", { scope: "col",
        class: name === "Estimated" || name === "Actual" ? "num" : null, text: name })))),
      h("tbody", {}, rows)), "Jobs");
  }

  // ---- Wallet --------------------------------------------------------------------------

  async function renderWallet(view) {
    const heading = h("h1", { id: "wallet-title", tabindex: -1, text: "Wallet" });
    const summary = h("div", { id: "wallet-summary" });
    const budgetsBox = h("div");
    const chartBox = h("div", { class: "chart", id: "spend-chart" });
    const ledgerBox = h("div");
    const errorBox = h("div", { class: "error", role: "alert" });
    const days = select("days", [["7", "7 days"], ["14", "14 days"], ["30", "30 days"], ["90", "90 days"]], "14");
    const by = select("by", [["contentType", "content type"], ["provider", "provider"]], "contentType");
    const older = h("button", { type: "button", class: "quiet", text: "Older entries" });

    const loadSummary = async () => {
      try {
        const wallet = await api("GET", "/v1/wallet");
        summary.replaceChildren(h("dl", { class: "summary" },
          [["Available", wallet.available, "balance"], ["Held", wallet.held, "held"],
            ["Used", wallet.used, "used"], ["Open holds", wallet.openHolds, "holds"]].map(([name, value, key]) =>
            h("div", {}, h("dt", { text: name }), h("dd", { "data-wallet": key, text: credits(value) })))));
        budgetsBox.replaceChildren(budgetsTable(wallet.budgets || []));
      } catch (err) {
        showError(errorBox, err);
      }
    };
    const loadChart = async () => {
      try {
        const spend = await api("GET", `/v1/wallet/spend?days=${days.value}`);
        chartBox.replaceChildren(spendChart(spend, by.value));
      } catch (err) {
        chartBox.replaceChildren(h("p", { class: "error", text: describeError(err) }));
      }
    };
    const loadLedger = async (before) => {
      const query = new URLSearchParams({ limit: "25" });
      if (before) query.set("before", before);
      try {
        const page = await api("GET", `/v1/wallet/transactions?${query}`);
        const table = ledgerTable(page.transactions);
        if (before) ledgerBox.append(table); else ledgerBox.replaceChildren(table);
        older.hidden = !page.nextCursor;
        older.dataset.cursor = page.nextCursor || "";
      } catch (err) {
        showError(errorBox, err);
      }
    };
    days.addEventListener("change", loadChart);
    by.addEventListener("change", loadChart);
    older.addEventListener("click", () => loadLedger(older.dataset.cursor));
    const refresh = h("button", { type: "button", class: "quiet", text: "Refresh",
      onclick: () => Promise.all([loadSummary(), loadChart(), loadLedger(null)]) });

    view.append(
      h("section", { "aria-labelledby": "wallet-title" }, h("div", { class: "row" }, heading), errorBox,
        summary, h("div", { class: "row" }, refresh)),
      h("section", { "aria-labelledby": "budgets-title" }, h("h2", { id: "budgets-title", text: "Budgets" }), budgetsBox),
      h("section", { "aria-labelledby": "spend-title" }, h("h2", { id: "spend-title", text: "Spend per day" }),
        h("form", { class: "grid", onsubmit: (e) => e.preventDefault() }, field("Period", days), field("Split by", by)),
        chartBox),
      h("section", { "aria-labelledby": "ledger-title" }, h("h2", { id: "ledger-title", text: "Ledger" }),
        ledgerBox, older));
    await Promise.all([loadSummary(), loadChart(), loadLedger(null)]);
  }

  function budgetsTable(budgets) {
    if (!budgets.length) return h("p", { class: "hint", text: "No budgets are set." });
    return stackable(h("table", {},
      h("thead", {}, h("tr", {}, ["Scope", "Period", "Cap", "Spent", "Held", "Remaining", "Use"].map((n) =>
        h("th", { scope: "col", text: n })))),
      h("tbody", {}, budgets.map((b) => {
        const cap = Number(b.cap);
        const spent = Number(b.spent);
        return h("tr", {},
          h("td", { text: b.subject ? `${b.scope} ${b.subject}` : b.scope }),
          h("td", { text: `${b.period} from ${b.periodStart ? b.periodStart.slice(0, 10) : "—"}` }),
          h("td", { class: "num", text: credits(b.cap) }),
          h("td", { class: "num", text: credits(b.spent) }),
          h("td", { class: "num", text: credits(b.held) }),
          h("td", { class: "num", text: credits(b.remaining) }),
          h("td", {}, h("meter", { min: 0, max: cap || 1, value: Math.min(spent, cap || 1), high: (cap || 1) * 0.8,
            "aria-label": `${credits(b.spent)} of ${credits(b.cap)} spent` })));
      }))), "Budgets");
  }

  function ledgerTable(rows) {
    if (!rows.length) return h("p", { class: "hint", text: "No entries." });
    return stackable(h("table", {},
      h("thead", {}, h("tr", {}, ["When", "Type", "Amount", "Job", "Reference"].map((n) =>
        h("th", { scope: "col", class: n === "Amount" ? "num" : null, text: n })))),
      h("tbody", {}, rows.map((t) => h("tr", {},
        h("td", { text: when(t.createdAt) }),
        h("td", { text: t.type }),
        h("td", { class: "num", text: credits(t.amount) }),
        h("td", {}, t.jobId ? h("a", { href: `#/job/${t.jobId}`, text: t.jobId.slice(0, 8) }) : "—"),
        h("td", { text: t.key || "" }))))), "Ledger entries");
  }

  // A stacked bar per day, one colour per content type or provider, drawn as SVG.
  function spendChart(spend, by) {
    const dayList = [];
    for (let d = new Date(`${spend.from}T00:00:00Z`); dayList.length < spend.days; d.setUTCDate(d.getUTCDate() + 1)) {
      dayList.push(d.toISOString().slice(0, 10));
    }
    const groups = [...new Set(spend.entries.map((e) => e[by]))].sort();
    const totals = new Map(dayList.map((d) => [d, new Map()]));
    for (const e of spend.entries) {
      const day = totals.get(e.day);
      if (day) day.set(e[by], (day.get(e[by]) || 0) + Number(e.cost));
    }
    const dayTotal = (d) => [...totals.get(d).values()].reduce((a, b) => a + b, 0);
    const peak = Math.max(0, ...dayList.map(dayTotal)) || 1;
    const width = 640, height = 240, left = 48, bottom = 28, top = 10;
    const plotH = height - bottom - top;
    const step = (width - left - 8) / dayList.length;
    const barW = Math.max(2, step * 0.7);
    const colour = (g) => PALETTE[groups.indexOf(g) % PALETTE.length];
    const summaryText = `Spend per day over ${spend.days} days by ${by === "provider" ? "provider" : "content type"}; ` +
      `total ${credits(spend.total)} credits` + (groups.length ? `, split into ${groups.join(", ")}.` : ", nothing spent.");
    const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": summaryText },
      svg("line", { class: "axis", x1: left, y1: top + plotH, x2: width - 4, y2: top + plotH }),
      svg("line", { class: "axis", x1: left, y1: top, x2: left, y2: top + plotH }),
      svg("text", { x: left - 6, y: top + 8, "text-anchor": "end", text: credits(peak.toFixed(6)) }),
      svg("text", { x: left - 6, y: top + plotH, "text-anchor": "end", text: "0" }));
    dayList.forEach((day, i) => {
      let y = top + plotH;
      const x = left + i * step + (step - barW) / 2;
      for (const g of groups) {
        const value = totals.get(day).get(g) || 0;
        if (!value) continue;
        const barH = (value / peak) * plotH;
        y -= barH;
        chart.append(svg("rect", { x: x.toFixed(1), y: y.toFixed(1), width: barW.toFixed(1),
          height: Math.max(barH, 0.5).toFixed(1), fill: colour(g), "data-day": day, "data-group": g },
          svg("title", { text: `${day}, ${g}: ${credits(value.toFixed(6))} credits` })));
      }
      const labelEvery = Math.ceil(dayList.length / 8);
      if (i % labelEvery === 0 || i === dayList.length - 1) {
        chart.append(svg("text", { x: (x + barW / 2).toFixed(1), y: height - 8, "text-anchor": "middle",
          text: day.slice(5) }));
      }
    });
    const legend = h("ul", { class: "legend", "aria-label": "Legend" }, groups.map((g) =>
      h("li", {}, svg("svg", { viewBox: "0 0 12 12", "aria-hidden": "true" },
        svg("rect", { width: 12, height: 12, fill: colour(g) })), g)));
    const table = h("details", {}, h("summary", { text: "Spend as a table" }),
      h("div", { class: "table-scroll" }, h("table", {},
        h("thead", {}, h("tr", {}, ["Day", by === "provider" ? "Provider" : "Content type", "Credits"].map((n) =>
          h("th", { scope: "col", text: n })))),
        h("tbody", {}, spend.entries.map((e) => h("tr", {}, h("td", { text: e.day }), h("td", { text: e[by] }),
          h("td", { class: "num", text: credits(e.cost) })))))));
    return h("div", {}, h("p", { class: "hint", text: summaryText }), chart, legend, table);
  }

  // ---- Admin ---------------------------------------------------------------------------

  function adminForm(title, controls, submitText, action) {
    const result = h("div", { role: "status", class: "ok" });
    const errorBox = h("div", { class: "error", role: "alert" });
    const titleId = nextId("admin");
    const form = h("form", { class: "stack", "aria-labelledby": titleId, novalidate: true },
      h("h2", { id: titleId, text: title }), h("div", { class: "grid" }, controls),
      h("div", { class: "row" }, h("button", { type: "submit", text: submitText })), result, errorBox);
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      showError(errorBox, null);
      result.textContent = "";
      const button = form.querySelector("button[type=submit]");
      button.disabled = true;
      try {
        result.textContent = await action(form.elements);
      } catch (err) {
        showError(errorBox, err);
      } finally {
        button.disabled = false;
      }
    });
    return h("section", { class: "panel" }, form);
  }

  const reference = (kind) => `console-${kind}-${new Date().toISOString()}`;
  const moved = (r) => `${r.created ? "Done" : "Already recorded (same reference)"}: available ` +
    `${credits(r.wallet.available)}, held ${credits(r.wallet.held)}.`;

  async function renderAdmin(view) {
    const keysBox = h("div");
    const loadKeys = async () => {
      try {
        const { providerKeys } = await api("GET", "/v1/provider-keys");
        keysBox.replaceChildren(providerKeys.length ? h("div", { class: "table-scroll" }, h("table", {},
          h("thead", {}, h("tr", {}, ["Provider", "Fingerprint", "Updated", ""].map((n) => h("th", { scope: "col", text: n })))),
          h("tbody", {}, providerKeys.map((k) => h("tr", {},
            h("td", { text: k.provider }), h("td", {}, h("code", { text: k.fingerprint })),
            h("td", { text: when(k.updatedAt) }),
            h("td", {}, h("button", { type: "button", class: "danger", text: "Remove",
              "aria-label": `Remove the ${k.provider} key`, onclick: async () => {
                try { await api("DELETE", `/v1/provider-keys/${encodeURIComponent(k.provider)}`); } catch (err) { announce(describeError(err)); }
                loadKeys();
              } }))))))) : h("p", { class: "hint", text: "No provider keys are stored." }));
      } catch (err) {
        const box = h("div", { class: "error", role: "alert" });
        showError(box, err);
        keysBox.replaceChildren(box);
      }
    };
    view.append(h("section", { "aria-labelledby": "admin-title" },
      h("h1", { id: "admin-title", tabindex: -1, text: "Admin" }),
      h("p", { class: "hint", text: "Actions for admin keys: every change is recorded in the ledger or the audit log." })));
    view.append(adminForm("Deposit credits", [
      field("Amount", h("input", { name: "amount", type: "number", min: 0, step: "any", required: true })),
      field("Reference", h("input", { name: "reference", type: "text", value: reference("deposit") }),
        "Unique: repeating it changes nothing"),
      field("Reason", h("input", { name: "reason", type: "text" })),
    ], "Deposit", async (f) => moved(await api("POST", "/v1/wallet/deposits",
      { amount: f.amount.value, reference: f.reference.value, reason: f.reason.value }))));
    view.append(adminForm("Refund a job", [
      field("Job id", h("input", { name: "jobId", type: "text", required: true, spellcheck: "false" })),
      field("Amount", h("input", { name: "amount", type: "number", min: 0, step: "any" }), "Empty: the whole charge"),
      field("Reference", h("input", { name: "reference", type: "text", value: reference("refund") })),
      field("Reason", h("input", { name: "reason", type: "text" })),
    ], "Refund", async (f) => {
      const body = { jobId: f.jobId.value.trim(), reference: f.reference.value, reason: f.reason.value };
      if (f.amount.value) body.amount = f.amount.value;
      return moved(await api("POST", "/v1/wallet/refunds", body));
    }));
    view.append(adminForm("Set a budget", [
      field("Scope", select("scope", [["company", "company"], ["user", "user"], ["api_key", "API key"]], "company")),
      field("Subject", h("input", { name: "subject", type: "text" }), "The user or API key id (not for company)"),
      field("Period", select("period", [["day", "day"], ["month", "month"]], "month")),
      field("Cap", h("input", { name: "cap", type: "number", min: 0, step: "any", required: true }), "Credits"),
    ], "Set budget", async (f) => {
      const body = { scope: f.scope.value, period: f.period.value, cap: f.cap.value };
      if (f.subject.value.trim()) body.subject = f.subject.value.trim();
      const list = await api("PUT", "/v1/wallet/budgets", body);
      return `Saved: ${list.length} budget(s) set.`;
    }));
    view.append(adminForm("Provider keys", [
      field("Provider", select("provider", KEYED_PROVIDERS.map((p) => [p, p]), "openai")),
      field("Key", h("input", { name: "apiKey", type: "password", autocomplete: "off", spellcheck: "false" }),
        "Stored encrypted; only its fingerprint is shown back"),
    ], "Save key", async (f) => {
      const saved = await api("PUT", `/v1/provider-keys/${encodeURIComponent(f.provider.value)}`, { apiKey: f.apiKey.value });
      f.apiKey.value = "";
      loadKeys();
      return `Saved: ${saved.provider} ${saved.fingerprint}`;
    }));
    view.lastElementChild.append(keysBox);
    await loadKeys();
  }

  // ---- Sign-in and routing ---------------------------------------------------------------

  let currentStops = [];

  async function signIn(key) {
    state.key = key;
    await api("GET", "/v1/wallet"); // the key works, or this throws its error
    try {
      await api("GET", "/v1/provider-keys");
      state.admin = true;
    } catch (err) {
      state.admin = false;
      if (err.status !== 403) throw err;
    }
    window.sessionStorage.setItem(KEY_SLOT, key);
  }

  function signOut() {
    for (const stop of currentStops) stop();
    window.sessionStorage.removeItem(KEY_SLOT);
    state.key = null;
    state.providers = [];
    state.sessionCards = null;
    window.location.hash = "";
    showSignedIn(false);
  }

  function showSignedIn(yes) {
    document.getElementById("sign-in").hidden = yes;
    document.getElementById("view").hidden = !yes;
    document.getElementById("nav").hidden = !yes;
    document.getElementById("nav-admin").hidden = !(yes && state.admin);
  }

  async function route() {
    if (!state.key) return;
    for (const stop of currentStops) stop();
    currentStops = [];
    const [, name = "submit", arg] = (window.location.hash || "#/submit").split("/");
    const view = document.getElementById("view");
    view.replaceChildren();
    for (const link of document.querySelectorAll("#nav a")) {
      if (link.dataset.view === name) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    const pages = { submit: renderCreate, jobs: renderJobs, wallet: renderWallet, admin: renderAdmin };
    if (name === "job" && arg) await renderJob(view, decodeURIComponent(arg));
    else if (name === "admin" && !state.admin) view.append(h("p", { class: "error", role: "alert",
      text: "Admin actions need an admin-scoped key." }));
    else await (pages[name] || renderCreate)(view);
    const heading = view.querySelector("h1");
    if (heading) heading.focus();
    document.title = `${heading ? heading.textContent : "Console"} — Content pipeline console`;
  }

  function start() {
    const form = document.getElementById("sign-in-form");
    const errorBox = document.getElementById("sign-in-error");
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      showError(errorBox, null);
      const input = document.getElementById("api-key");
      const key = input.value.trim();
      if (!key) {
        showError(errorBox, new ApiError(0, "UNAUTHORIZED", "Enter an API key."));
        input.focus();
        return;
      }
      try {
        await signIn(key);
        input.value = "";
        showSignedIn(true);
        await route();
      } catch (err) {
        state.key = null;
        showError(errorBox, err);
        input.focus();
      }
    });
    document.getElementById("sign-out").addEventListener("click", signOut);
    window.addEventListener("hashchange", route);
    const saved = window.sessionStorage.getItem(KEY_SLOT);
    if (saved) {
      signIn(saved).then(() => { showSignedIn(true); return route(); }).catch((err) => {
        window.sessionStorage.removeItem(KEY_SLOT);
        state.key = null;
        showError(errorBox, err);
      });
    }
  }

  start();
}());
