/*
 * rawjobs dashboard: plain JavaScript, no build step, no dependencies.
 * Wire contract: PROTOCOL.md (REST, SSE /api/jobs/{id}/progress, WebSocket /ws/queue).
 *
 * State lives in a few Maps; the DOM is only touched where something changed.
 * All text from the server goes in through textContent, never innerHTML.
 */
(function () {
  "use strict";

  const TOKEN_KEY = "rawjobs-token";
  const STATUSES = ["pending", "running", "completed", "failed", "cancelled"];
  const FINISHED = new Set(["completed", "failed", "cancelled"]);
  const BACKOFF_BASE_MS = 1000;
  const BACKOFF_MAX_MS = 30000;
  const NOTICE_MS = 6000;

  // Job options of the create form: input id, body key, and whether the job type
  // has a default for it (GET /api/job-types lists them under "options"). An option
  // left at its type's default is not sent, so the type's default applies.
  const JOB_OPTIONS = [
    { id: "opt-priority", key: "priority", typed: true },
    { id: "opt-max-attempts", key: "max_attempts", typed: true },
    { id: "opt-delay", key: "delay", typed: false },
    { id: "opt-timeout", key: "timeout", typed: true },
  ];

  // Preferred order of fields in the details panel; other fields follow.
  const DETAIL_ORDER = [
    "id", "type", "status", "params", "progress", "priority", "attempts", "max_attempts",
    "timeout", "created_at", "run_at", "started_at", "completed_at",
  ];

  const state = {
    jobs: new Map(),          // job id -> job object
    rows: new Map(),          // job id -> row parts (elements of its list row)
    versions: new Map(),      // job id -> local change counter (guards stale REST reads)
    stats: emptyStats(),
    jobTypes: [],
    jobTypesKey: "",
    paramInputs: [],          // [{param, input}] of the current job type
    selectedId: null,
    detailCells: new Map(),   // field name -> <dd> of the details panel
    detailKey: "",
    source: null,             // EventSource following the selected job
    followLost: false,        // the stream broke before the job's terminal event
    followFailures: 0,        // consecutive broken streams for the selected job
    followTimer: null,
    successTimer: null,
    ws: null,
    wsEverOpened: false,
    wsAttempts: 0,
    reconnectTimer: null,
    authProbed: false,
    lastSeq: null,
    resyncPending: false,
    resyncedFor: new Set(),   // unknown job ids we already resynced for
    snapshots: 0,             // queue_state snapshots applied so far
    tokenPrompted: false,
    noticeTimer: null,
  };

  /* ------------------------------------------------------------------ helpers */

  function $(id) {
    return document.getElementById(id);
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  // Sets text only when it differs, so unchanged nodes are left alone.
  function setText(node, text) {
    if (!node) return;
    const value = text === undefined || text === null ? "" : String(text);
    if (node.textContent !== value) node.textContent = value;
  }

  function setHidden(node, hidden) {
    if (node && node.hidden !== hidden) node.hidden = hidden;
  }

  function parseJson(text) {
    try {
      return JSON.parse(text);
    } catch (_) {
      return null;
    }
  }

  function toId(value) {
    const id = Number(value);
    return Number.isInteger(id) ? id : null;
  }

  function nowSeconds() {
    return Date.now() / 1000;
  }

  function formatTime(seconds) {
    if (typeof seconds !== "number") return "";
    return new Date(seconds * 1000).toLocaleTimeString();
  }

  function formatDateTime(seconds) {
    if (typeof seconds !== "number") return String(seconds);
    return new Date(seconds * 1000).toLocaleString();
  }

  function clampPercent(value) {
    const n = Math.round(Number(value));
    if (!Number.isFinite(n)) return 0;
    return Math.min(100, Math.max(0, n));
  }

  function emptyStats() {
    return { pending: 0, running: 0, completed: 0, failed: 0, cancelled: 0 };
  }

  function showNotice(message) {
    const notice = $("notice");
    if (!notice) return;
    setText(notice, message);
    notice.hidden = false;
    clearTimeout(state.noticeTimer);
    state.noticeTimer = setTimeout(() => { notice.hidden = true; }, NOTICE_MS);
  }

  /* ------------------------------------------------------- access token, REST */

  function getToken() {
    try {
      return sessionStorage.getItem(TOKEN_KEY) || "";
    } catch (_) {
      return "";
    }
  }

  function saveToken(token) {
    try {
      sessionStorage.setItem(TOKEN_KEY, token);
    } catch (_) {
      /* storage unavailable: the token is simply not kept */
    }
  }

  // Asks for a token at most once per page load; true when one was entered.
  function askForToken() {
    if (state.tokenPrompted) return false;
    state.tokenPrompted = true;
    const answer = window.prompt("This rawjobs server needs an access token:");
    const token = answer ? answer.trim() : "";
    if (!token) return false;
    saveToken(token);
    onTokenChanged();
    return true;
  }

  // Appends ?token=... for the WebSocket and EventSource, which cannot send headers.
  function withToken(url) {
    const token = getToken();
    if (!token) return url;
    const sep = url.indexOf("?") === -1 ? "?" : "&";
    return url + sep + "token=" + encodeURIComponent(token);
  }

  // fetch() with the bearer token; a 401 asks for a token once and retries.
  async function api(path, options, retried) {
    const opts = Object.assign({}, options || {});
    const headers = new Headers(opts.headers || {});
    const token = getToken();
    if (token) headers.set("Authorization", "Bearer " + token);
    opts.headers = headers;
    const response = await fetch(path, opts);
    if (response.status === 401 && !retried && askForToken()) {
      return api(path, options, true);
    }
    return response;
  }

  async function readJson(response) {
    try {
      return await response.json();
    } catch (_) {
      return null;
    }
  }

  function errorText(body, response) {
    if (body && typeof body.error === "string") return body.error;
    return "Request failed (HTTP " + response.status + ")";
  }

  function postJson(path, body) {
    return api(path, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
  }

  // A new token: reopen what cannot send headers (the failed request itself is retried by api()).
  function onTokenChanged() {
    if (!socketIsOpen()) reconnectNow();
    if (state.selectedId !== null) followJob(state.selectedId);
  }

  /* --------------------------------------------------------------- header */

  function renderStats() {
    for (const status of STATUSES) setText($("stat-" + status), state.stats[status] || 0);
  }

  // Moves one job from one status count to another.
  function countTransition(from, to) {
    if (from === to) return;
    if (from && from in state.stats) state.stats[from] = Math.max(0, state.stats[from] - 1);
    if (to && to in state.stats) state.stats[to] += 1;
    renderStats();
  }

  function statsFrom(source, jobs) {
    const stats = emptyStats();
    if (source && typeof source === "object") {
      for (const status of STATUSES) stats[status] = Number(source[status]) || 0;
      return stats;
    }
    for (const job of jobs) if (job.status in stats) stats[job.status] += 1;
    return stats;
  }

  function setConnection(stateName, text) {
    const node = $("connection-status");
    if (!node) return;
    if (node.dataset.state !== stateName) node.dataset.state = stateName;
    setText(node, text);
  }

  /* --------------------------------------------------------------- worker */

  function renderWorker(worker) {
    if (!worker || typeof worker !== "object") return;
    const active = Number(worker.active) || 0;
    const capacity = Number(worker.capacity) || 0;
    setText($("worker-active"), active);
    setText($("worker-capacity"), capacity);
    setText($("worker-processed"), Number(worker.processed) || 0);
    const running = worker.is_running !== false;
    const badge = $("worker-state");
    if (badge) {
      badge.dataset.state = running ? "running" : "stopped";
      setText(badge, running ? "running" : "stopped");
    }
    const fill = $("worker-load-fill");
    if (fill) fill.style.width = (capacity ? Math.min(100, (active / capacity) * 100) : 0) + "%";
    renderNodes(worker.nodes);
  }

  /** With several nodes on PostgreSQL, one line per node: id, active/capacity, processed. */
  function renderNodes(nodes) {
    const list = $("worker-nodes");
    if (!list) return;
    list.hidden = !Array.isArray(nodes) || nodes.length === 0;
    if (list.hidden) return;
    list.replaceChildren(...nodes.map((node) => {
      const item = el("li", "worker-node");
      item.dataset.nodeId = String(node.id);
      item.append(el("span", "worker-node-id", String(node.id)),
        el("span", "worker-node-load", `${Number(node.active) || 0}/${Number(node.capacity) || 0}`),
        el("span", "worker-node-processed", `${Number(node.processed) || 0} processed`));
      return item;
    }));
  }

  /* ------------------------------------------------------------- job rows */

  function normalizeJob(raw) {
    const job = Object.assign({}, raw);
    job.id = toId(raw.id);
    if (!STATUSES.includes(job.status)) job.status = "pending";
    if (!job.progress || typeof job.progress !== "object") {
      job.progress = { percent: 0, message: job.status === "pending" ? "Queued" : "" };
    }
    return job;
  }

  function makeButton(label, className) {
    const button = el("button", "btn btn-small " + className, label);
    button.type = "button";
    return button;
  }

  // Builds the elements of one row; renderRow fills them in.
  function buildRow(job) {
    const row = el("li", "job-row");
    row.id = "job-" + job.id;
    row.dataset.jobId = String(job.id);
    row.tabIndex = 0;
    const parts = { row };

    const head = el("div", "job-head");
    parts.idLabel = el("span", "job-id", "#" + job.id);
    parts.type = el("span", "job-type");
    parts.badge = el("span", "status-badge");
    head.append(parts.idLabel, parts.type, parts.badge);

    const progress = el("div", "job-progress");
    parts.bar = el("div", "progress-bar");
    parts.bar.setAttribute("role", "progressbar");
    parts.bar.setAttribute("aria-valuemin", "0");
    parts.bar.setAttribute("aria-valuemax", "100");
    parts.fill = el("div", "progress-fill");
    parts.bar.append(parts.fill);
    parts.percent = el("span", "progress-text");
    progress.append(parts.bar, parts.percent);

    parts.message = el("div", "progress-message");

    const meta = el("div", "job-meta");
    parts.priority = el("span", "job-priority");
    parts.attempts = el("span", "job-attempts");
    parts.runAt = el("span", "job-run-at");
    meta.append(parts.priority, parts.attempts, parts.runAt);

    parts.actions = el("div", "job-actions");
    parts.cancel = makeButton("Cancel", "cancel-btn");
    parts.retry = makeButton("Retry", "retry-btn");
    parts.actionKey = "";

    row.append(head, progress, parts.message, meta, parts.actions);
    return parts;
  }

  function renderRow(parts, job) {
    setText(parts.type, job.type);
    renderStatus(parts, job.status);
    renderProgress(parts, job.progress);
    renderMeta(parts, job);
    renderActions(parts, job.status);
  }

  function renderStatus(parts, status) {
    if (parts.row.dataset.status !== status) parts.row.dataset.status = status;
    const className = "status-badge status-" + status;
    if (parts.badge.className !== className) parts.badge.className = className;
    setText(parts.badge, status);
  }

  // The only DOM a job_progress event touches: bar width, percent text, message.
  function renderProgress(parts, progress) {
    const percent = clampPercent(progress && progress.percent);
    const width = percent + "%";
    if (parts.fill.style.width !== width) parts.fill.style.width = width;
    if (parts.bar.getAttribute("aria-valuenow") !== String(percent)) {
      parts.bar.setAttribute("aria-valuenow", String(percent));
    }
    setText(parts.percent, width);
    setText(parts.message, progress && progress.message);
  }

  function renderMeta(parts, job) {
    setText(parts.priority, "priority " + (job.priority !== undefined && job.priority !== null ? job.priority : 0));
    setText(parts.attempts, "attempts " + (Number(job.attempts) || 0));
    const scheduled = job.status === "pending" && typeof job.run_at === "number";
    setText(parts.runAt, scheduled ? "scheduled " + formatTime(job.run_at) : "");
    setHidden(parts.runAt, !scheduled);
  }

  // Cancel for pending/running, Retry for failed/cancelled; absent otherwise.
  function renderActions(parts, status) {
    const canCancel = status === "pending" || status === "running";
    const canRetry = status === "failed" || status === "cancelled";
    const key = (canCancel ? "c" : "") + (canRetry ? "r" : "");
    if (key === parts.actionKey) return;
    parts.actionKey = key;
    const buttons = [];
    if (canCancel) buttons.push(parts.cancel);
    if (canRetry) buttons.push(parts.retry);
    parts.cancel.disabled = false;
    parts.retry.disabled = false;
    parts.actions.replaceChildren(...buttons);
  }

  // Inserts a row keeping the list newest (highest id) first.
  function placeRow(row, id) {
    const list = $("job-list");
    if (!list) return;
    let before = null;
    for (const child of list.children) {
      if (Number(child.dataset.jobId) < id) {
        before = child;
        break;
      }
    }
    list.insertBefore(row, before);
  }

  function renderEmptyState() {
    setHidden($("job-list-empty"), state.jobs.size > 0);
  }

  function bumpVersion(id) {
    state.versions.set(id, (state.versions.get(id) || 0) + 1);
  }

  // Adds a job that is not known yet; `counted` says whether stats already include it.
  function insertJob(raw, counted) {
    const job = normalizeJob(raw);
    if (job.id === null || state.jobs.has(job.id)) return;
    state.jobs.set(job.id, job);
    bumpVersion(job.id);
    const parts = buildRow(job);
    renderRow(parts, job);
    state.rows.set(job.id, parts);
    placeRow(parts.row, job.id);
    if (job.id === state.selectedId) parts.row.classList.add("selected");
    if (!counted) countTransition(null, job.status);
    renderEmptyState();
  }

  function removeJob(id) {
    const parts = state.rows.get(id);
    if (parts) parts.row.remove();
    state.rows.delete(id);
    state.jobs.delete(id);
    state.versions.delete(id);
    if (state.selectedId === id) selectJob(null);
  }

  // Replaces every job with `jobs` (a queue_state snapshot).
  function rebuildList(jobs) {
    state.jobs.clear();
    state.rows.clear();
    const list = $("job-list");
    const fragment = document.createDocumentFragment();
    const sorted = jobs.map(normalizeJob).filter((job) => job.id !== null);
    sorted.sort((a, b) => b.id - a.id);
    for (const job of sorted) {
      state.jobs.set(job.id, job);
      bumpVersion(job.id);
      const parts = buildRow(job);
      renderRow(parts, job);
      if (job.id === state.selectedId) parts.row.classList.add("selected");
      state.rows.set(job.id, parts);
      fragment.append(parts.row);
    }
    if (list) list.replaceChildren(fragment);
    renderEmptyState();
  }

  /*
   * Moves job `id` to `status` (when given) and merges `fields`, re-rendering only its
   * row. `assumedFrom` is the status an unknown job is assumed to leave.
   */
  function updateJob(id, status, fields, assumedFrom) {
    const job = state.jobs.get(id);
    if (!job) {
      onUnknownJob(id, assumedFrom, status);
      return;
    }
    const from = job.status;
    if (status) countTransition(from, status);
    Object.assign(job, fields || {});
    if (status) job.status = status;
    bumpVersion(id);
    const parts = state.rows.get(id);
    if (parts) renderRow(parts, job);
    if (id === state.selectedId) {
      renderDetails();
      // A retried job is live again: follow it if its stream had ended.
      if (FINISHED.has(from) && !FINISHED.has(job.status) && !state.source) followJob(id);
    }
  }

  // An event for a job we do not hold: resync once, then just keep the counts right.
  function onUnknownJob(id, from, to) {
    if (!to) return;
    if (!state.resyncedFor.has(id) && socketIsOpen()) {
      state.resyncedFor.add(id);
      requestState();
      return;
    }
    countTransition(from, to);
  }

  function applyProgress(id, percent, message) {
    const job = state.jobs.get(id);
    if (!job) return;
    job.progress = { percent: clampPercent(percent), message: message === undefined ? "" : message };
    const parts = state.rows.get(id);
    if (parts) renderProgress(parts, job.progress);
    if (id === state.selectedId) renderDetails();
  }

  function removeFinishedJobs() {
    for (const [id, job] of Array.from(state.jobs)) {
      if (FINISHED.has(job.status)) removeJob(id);
    }
    state.stats.completed = 0;
    state.stats.failed = 0;
    state.stats.cancelled = 0;
    renderStats();
    renderEmptyState();
  }

  /* ------------------------------------------------------ queue events (WS) */

  const EVENTS = {
    job_created(data) {
      const id = toId(data.id);
      if (id === null) return;
      if (state.jobs.has(id)) updateJob(id, data.status, data);
      else insertJob(data, false);
    },
    job_started(data) {
      const id = toId(data.job_id);
      const job = state.jobs.get(id);
      updateJob(id, "running", {
        started_at: data.started_at,
        run_at: null,
        error: null,
        result: null,
        attempts: job ? (Number(job.attempts) || 0) + 1 : undefined,
        progress: { percent: 0, message: "Starting..." },
      }, "pending");
    },
    job_progress(data) {
      applyProgress(toId(data.job_id), data.percent, data.message);
    },
    job_completed(data) {
      const id = toId(data.job_id);
      const job = state.jobs.get(id);
      const started = job && typeof job.started_at === "number" ? job.started_at : null;
      const duration = Number(data.duration);
      updateJob(id, "completed", {
        result: data.result === undefined ? null : data.result,
        duration: data.duration,
        progress: { percent: 100, message: "Complete" },
        completed_at: started !== null && Number.isFinite(duration) ? started + duration : nowSeconds(),
      }, "running");
    },
    job_failed(data) {
      updateJob(toId(data.job_id), "failed", { error: data.error, completed_at: nowSeconds() }, "running");
    },
    job_cancelled(data) {
      updateJob(toId(data.job_id), "cancelled", { completed_at: nowSeconds() }, "pending");
    },
    job_retrying(data) {
      updateJob(toId(data.job_id), "pending", {
        run_at: data.run_at,
        error: data.error,
        progress: { percent: 0, message: "Retry scheduled (attempt " + data.attempt + ")" },
      }, "running");
    },
    jobs_cleared() {
      removeFinishedJobs();
    },
    worker_stats(data) {
      renderWorker(data);
    },
  };

  // Direct (flat) replies; acks are ignored because the broadcast carries the change.
  const REPLIES = {
    queue_state: applySnapshot,
    job_types(msg) {
      if (Array.isArray(msg.job_types)) setJobTypes(msg.job_types);
    },
    error(msg) {
      if (msg.message) showNotice(String(msg.message));
    },
  };

  // Replaces everything known with a queue_state snapshot.
  function applySnapshot(msg) {
    state.snapshots += 1;
    state.lastSeq = typeof msg.seq === "number" ? msg.seq : null;
    state.resyncPending = false;
    const jobs = Array.isArray(msg.jobs) ? msg.jobs : [];
    if (Array.isArray(msg.job_types)) setJobTypes(msg.job_types);
    rebuildList(jobs);
    state.stats = statsFrom(msg.stats, state.jobs.values());
    renderStats();
    renderWorker(msg.worker);
    if (state.selectedId !== null && !state.jobs.has(state.selectedId)) selectJob(null);
    else renderDetails();
    // The server is back and still has the selected job: follow it again.
    if (state.followLost && state.selectedId !== null && !state.source) followJob(state.selectedId);
  }

  // Checks a broadcast's seq; false when the event is already reflected.
  function acceptSeq(seq) {
    if (state.lastSeq === null) {
      state.lastSeq = seq;
      return true;
    }
    if (seq === state.lastSeq + 1) {
      state.lastSeq = seq;
      return true;
    }
    requestState();
    if (seq <= state.lastSeq) return false;
    state.lastSeq = seq;
    return true;
  }

  function handleMessage(text) {
    const msg = parseJson(text);
    if (!msg || typeof msg !== "object" || typeof msg.type !== "string") return;
    const isBroadcast = typeof msg.seq === "number" && msg.data !== undefined;
    if (isBroadcast) {
      const handler = EVENTS[msg.type];
      if (!acceptSeq(msg.seq) || !handler) return;
      if (msg.data && typeof msg.data === "object") handler(msg.data);
      return;
    }
    const reply = REPLIES[msg.type];
    if (reply) reply(msg);
  }

  /* -------------------------------------------------------------- WebSocket */

  function socketIsOpen() {
    return !!state.ws && state.ws.readyState === WebSocket.OPEN;
  }

  function send(message) {
    if (!socketIsOpen()) return false;
    state.ws.send(JSON.stringify(message));
    return true;
  }

  function requestState() {
    if (state.resyncPending) return;
    if (send({ type: "get_state" })) state.resyncPending = true;
  }

  function socketUrl() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    return withToken(scheme + "//" + location.host + "/ws/queue");
  }

  function connect() {
    clearTimeout(state.reconnectTimer);
    state.reconnectTimer = null;
    setConnection("connecting", state.wsAttempts ? "Reconnecting..." : "Connecting...");
    let ws;
    try {
      ws = new WebSocket(socketUrl());
    } catch (_) {
      scheduleReconnect();
      return;
    }
    let opened = false;
    state.ws = ws;
    ws.onopen = () => {
      if (state.ws !== ws) return;
      opened = true;
      state.wsEverOpened = true;
      state.wsAttempts = 0;
      state.authProbed = false;
      setConnection("connected", "Connected");
    };
    ws.onmessage = (event) => {
      if (state.ws === ws && typeof event.data === "string") handleMessage(event.data);
    };
    // The browser reports failed connections itself; close always follows an error.
    ws.onerror = () => {};
    ws.onclose = () => {
      if (state.ws !== ws) return;
      state.ws = null;
      onSocketClosed(opened);
    };
  }

  // Only a socket that never worked on this page is probed (missing token, no WS).
  function onSocketClosed(opened) {
    state.lastSeq = null;
    state.resyncPending = false;
    scheduleReconnect();
    if (!opened && !state.wsEverOpened && !state.authProbed) {
      state.authProbed = true;
      probeServer();
    }
  }

  // 1s, 2s, 4s ... capped at 30s, with +-20% jitter.
  function scheduleReconnect() {
    const base = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * Math.pow(2, state.wsAttempts));
    const delay = Math.min(BACKOFF_MAX_MS, Math.round(base * (0.8 + Math.random() * 0.4)));
    state.wsAttempts += 1;
    const seconds = Math.max(1, Math.round(delay / 1000));
    setConnection("disconnected", "Disconnected, retrying in " + seconds + "s");
    clearTimeout(state.reconnectTimer);
    state.reconnectTimer = setTimeout(connect, delay);
  }

  function reconnectNow() {
    if (state.ws && state.ws.readyState === WebSocket.CONNECTING) return;
    if (socketIsOpen()) return;
    connect();
  }

  /*
   * After a failed handshake: GET /api/stats tells a missing token (401, which asks
   * for one) from a server that is down. Before any snapshot it also fills the
   * dashboard over REST so it is not empty while the socket is away.
   */
  async function probeServer() {
    try {
      const response = await api("/api/stats");
      if (!response.ok || state.snapshots > 0) return;
      const stats = await readJson(response);
      const jobsResponse = await api("/api/jobs?limit=1000");
      const jobs = jobsResponse.ok ? await readJson(jobsResponse) : null;
      if (state.snapshots > 0 || socketIsOpen() || !Array.isArray(jobs)) return;
      applySnapshot({ jobs, stats: stats && stats.queue, worker: stats && stats.worker, seq: null });
      state.snapshots = 0; // a real queue_state still replaces this
    } catch (_) {
      /* server unreachable: the reconnect loop keeps trying */
    }
  }

  /* ------------------------------------------------------------ create form */

  // Thrown by the form readers for input the browser could not parse.
  function FormError(message, param) {
    this.message = message;
    this.param = param;
  }

  function currentType() {
    const select = $("job-type");
    if (!select) return null;
    return state.jobTypes.find((type) => type.name === select.value) || null;
  }

  async function loadJobTypes() {
    try {
      const response = await api("/api/job-types");
      if (!response.ok) return;
      const types = await readJson(response);
      if (Array.isArray(types)) setJobTypes(types);
    } catch (_) {
      /* unreachable now; queue_state brings the job types too */
    }
  }

  // Rebuilds the type select only when the list really changed (keeps user input).
  function setJobTypes(types) {
    const key = JSON.stringify(types);
    if (key === state.jobTypesKey) return;
    state.jobTypesKey = key;
    state.jobTypes = types.filter((type) => type && typeof type.name === "string");
    const select = $("job-type");
    if (!select) return;
    const previous = select.value;
    select.replaceChildren(...state.jobTypes.map((type) => new Option(type.name, type.name)));
    if (state.jobTypes.some((type) => type.name === previous)) select.value = previous;
    renderParams();
  }

  function renderParams() {
    const type = currentType();
    setText($("job-type-description"), type ? type.description : "");
    const box = $("job-params-fields");
    state.paramInputs = [];
    const params = type && Array.isArray(type.params) ? type.params : [];
    const fields = params.filter((p) => p && p.name).map(paramField);
    if (box) box.replaceChildren(...fields);
    setHidden($("job-params"), fields.length === 0);
    applyOptionDefaults();
    clearFormMessages();
  }

  function paramField(param) {
    const id = "param-" + param.name;
    const wrap = el("div", "field field-" + (param.type || "string"));
    const label = el("label", null, param.name);
    label.htmlFor = id;
    const input = paramInput(param);
    input.id = id;
    input.name = param.name;
    state.paramInputs.push({ param, input });
    if (param.type === "boolean") wrap.append(input, label);
    else wrap.append(label, input);
    const hintText = paramHint(param);
    if (hintText) {
      const hint = el("small", "hint", hintText);
      hint.id = id + "-hint";
      input.setAttribute("aria-describedby", hint.id);
      wrap.append(hint);
    }
    return wrap;
  }

  function paramHint(param) {
    const bits = [];
    if (param.description) bits.push(param.description);
    const hasMin = param.min !== undefined && param.min !== null;
    const hasMax = param.max !== undefined && param.max !== null;
    if (hasMin && hasMax) bits.push("(" + param.min + " to " + param.max + ")");
    else if (hasMin) bits.push("(min " + param.min + ")");
    else if (hasMax) bits.push("(max " + param.max + ")");
    if (param.max_length) bits.push("(up to " + param.max_length + " characters)");
    return bits.join(" ");
  }

  function paramInput(param) {
    switch (param.type) {
      case "integer":
        return numberInput(param, "1");
      case "number":
        return numberInput(param, "any");
      case "boolean":
        return checkboxInput(param);
      case "choice":
        return choiceSelect(param);
      default:
        return textInput(param);
    }
  }

  function numberInput(param, step) {
    const input = document.createElement("input");
    input.type = "number";
    input.step = step;
    if (param.min !== undefined && param.min !== null) input.min = String(param.min);
    if (param.max !== undefined && param.max !== null) input.max = String(param.max);
    if (param.default !== undefined && param.default !== null) input.value = String(param.default);
    return input;
  }

  function checkboxInput(param) {
    const input = document.createElement("input");
    input.type = "checkbox";
    input.checked = param.default === true;
    return input;
  }

  function textInput(param) {
    const input = document.createElement("input");
    input.type = "text";
    if (param.max_length) input.maxLength = Number(param.max_length);
    if (param.min_length) input.minLength = Number(param.min_length);
    if (param.default !== undefined && param.default !== null) input.value = String(param.default);
    return input;
  }

  // Choices may be plain values or {value, label} objects.
  function choiceSelect(param) {
    const select = document.createElement("select");
    const choices = Array.isArray(param.choices) ? param.choices : [];
    choices.forEach((choice, index) => {
      const label = choice && typeof choice === "object" ? (choice.label || choice.value) : choice;
      const option = new Option(String(label), String(index));
      if (choiceValue(choice) === param.default) option.selected = true;
      select.append(option);
    });
    return select;
  }

  function choiceValue(choice) {
    return choice && typeof choice === "object" && "value" in choice ? choice.value : choice;
  }

  function readParam(param, input) {
    switch (param.type) {
      case "boolean":
        return input.checked;
      case "choice": {
        const choices = Array.isArray(param.choices) ? param.choices : [];
        const choice = choices[Number(input.value)];
        return choice === undefined ? undefined : choiceValue(choice);
      }
      case "integer":
      case "number":
        return readNumber(input, param.name);
      default:
        return input.value;
    }
  }

  // "" means "use the default"; the server validates ranges and integer-ness.
  function readNumber(input, name) {
    if (input.validity && input.validity.badInput) {
      throw new FormError(name + " must be a number", name);
    }
    const raw = input.value.trim();
    if (raw === "") return undefined;
    const value = Number(raw);
    return Number.isFinite(value) ? value : raw;
  }

  function collectParams() {
    const params = {};
    for (const { param, input } of state.paramInputs) {
      const value = readParam(param, input);
      if (value !== undefined) params[param.name] = value;
    }
    return params;
  }

  // The current job type's default for an option key (undefined when it has none).
  function typeDefault(key) {
    const type = currentType();
    const options = type && type.options && typeof type.options === "object" ? type.options : {};
    return options[key] === null ? undefined : options[key];
  }

  // Shows the selected type's defaults in the option inputs.
  function applyOptionDefaults() {
    for (const option of JOB_OPTIONS) {
      const input = $(option.id);
      if (!input) continue;
      const value = option.typed ? typeDefault(option.key) : undefined;
      input.value = value === undefined ? "" : String(value);
    }
  }

  // Adds only the options the user changed from the type's defaults.
  function collectOptions(body) {
    for (const option of JOB_OPTIONS) {
      const input = $(option.id);
      if (!input) continue;
      const value = readNumber(input, option.key);
      if (value === undefined || value === typeDefault(option.key)) continue;
      body[option.key] = value;
    }
  }

  function inputFor(name) {
    const param = state.paramInputs.find((entry) => entry.param.name === name);
    if (param) return param.input;
    const option = JOB_OPTIONS.find((entry) => entry.key === name);
    return option ? $(option.id) : null;
  }

  function clearFormMessages() {
    setHidden($("form-error"), true);
    setHidden($("form-success"), true);
    const form = $("create-job-form");
    if (!form) return;
    for (const node of form.querySelectorAll("[aria-invalid]")) {
      node.removeAttribute("aria-invalid");
    }
  }

  function showFormError(message, param) {
    const node = $("form-error");
    if (node) {
      setText(node, message);
      node.hidden = false;
    }
    const input = param ? inputFor(param) : null;
    if (input) input.setAttribute("aria-invalid", "true");
  }

  function showFormSuccess(message) {
    const node = $("form-success");
    if (!node) return;
    setText(node, message);
    node.hidden = false;
    clearTimeout(state.successTimer);
    state.successTimer = setTimeout(() => { node.hidden = true; }, NOTICE_MS);
  }

  function buildRequestBody() {
    const type = currentType();
    if (!type) throw new FormError("Choose a job type first.");
    const body = { job_type: type.name, params: collectParams() };
    collectOptions(body);
    return body;
  }

  async function onSubmit(event) {
    event.preventDefault();
    clearFormMessages();
    let body;
    try {
      body = buildRequestBody();
    } catch (error) {
      if (!(error instanceof FormError)) throw error;
      showFormError(error.message, error.param);
      return;
    }
    const button = $("create-job-button");
    if (button) button.disabled = true;
    try {
      const response = await postJson("/api/jobs", body);
      const data = await readJson(response);
      if (!response.ok) {
        showFormError(errorText(data, response), data && data.param);
        return;
      }
      onCreated(data);
    } catch (_) {
      showFormError("Could not reach the server.");
    } finally {
      if (button) button.disabled = false;
    }
  }

  // The job_created broadcast adds the row; without a socket we add it ourselves.
  function onCreated(data) {
    const id = data ? toId(data.id) : null;
    showFormSuccess(id !== null ? "Created job #" + id : "Job created");
    if (id === null || socketIsOpen() || state.jobs.has(id)) return;
    insertJob(Object.assign({ progress: { percent: 0, message: "Queued" } }, data), false);
  }

  /* -------------------------------------------------------- row actions */

  async function cancelJob(id, button) {
    button.disabled = true;
    try {
      const response = await api("/api/jobs/" + id, { method: "DELETE" });
      if (!response.ok) {
        showNotice(errorText(await readJson(response), response));
        return;
      }
      if (!socketIsOpen()) updateJob(id, "cancelled", { completed_at: nowSeconds() });
    } catch (_) {
      showNotice("Could not reach the server.");
    } finally {
      button.disabled = false;
    }
  }

  function isJobLike(data) {
    return !!data && typeof data === "object" && toId(data.id) !== null && typeof data.status === "string";
  }

  async function fetchJob(id) {
    const response = await api("/api/jobs/" + id);
    return response.ok ? readJson(response) : null;
  }

  /*
   * POST /api/jobs/{id}/retry. Broadcasts normally bring the change; as a fallback
   * the job is re-read, and applied only if nothing changed it meanwhile.
   */
  async function retryJob(id, button) {
    button.disabled = true;
    const version = state.versions.get(id);
    try {
      const response = await postJson("/api/jobs/" + id + "/retry", {});
      const data = await readJson(response);
      if (!response.ok) {
        showNotice(errorText(data, response));
        return;
      }
      if (isJobLike(data) && toId(data.id) !== id) {
        if (!state.jobs.has(toId(data.id))) insertJob(data, false); // retried as a new job
        return;
      }
      const fresh = isJobLike(data) ? data : await fetchJob(id);
      if (isJobLike(fresh) && state.versions.get(id) === version) updateJob(id, fresh.status, fresh);
    } catch (_) {
      showNotice("Could not reach the server.");
    } finally {
      button.disabled = false;
    }
  }

  async function clearCompleted() {
    if (send({ type: "clear_completed" })) return;
    try {
      const response = await api("/api/jobs/clear-completed", { method: "POST" });
      if (response.ok) removeFinishedJobs();
      else showNotice(errorText(await readJson(response), response));
    } catch (_) {
      showNotice("Could not reach the server.");
    }
  }

  function onListClick(event) {
    const row = event.target.closest(".job-row");
    if (!row) return;
    const id = toId(row.dataset.jobId);
    const button = event.target.closest("button");
    if (button && button.classList.contains("cancel-btn")) cancelJob(id, button);
    else if (button && button.classList.contains("retry-btn")) retryJob(id, button);
    else selectJob(id);
  }

  function onListKey(event) {
    if (event.key !== "Enter" && event.key !== " ") return;
    const row = event.target;
    if (!row.classList || !row.classList.contains("job-row")) return;
    event.preventDefault();
    selectJob(toId(row.dataset.jobId));
  }

  /* --------------------------------------------------------- job details */

  function selectJob(id) {
    if (state.selectedId === id) return;
    const previous = state.rows.get(state.selectedId);
    if (previous) previous.row.classList.remove("selected");
    state.selectedId = id;
    const current = state.rows.get(id);
    if (current) current.row.classList.add("selected");
    state.detailKey = "";
    state.followFailures = 0;
    renderDetails();
    if (id === null) closeSource();
    else followJob(id);
  }

  function detailFields(job) {
    const keys = DETAIL_ORDER.filter((key) => key in job);
    for (const key of Object.keys(job)) {
      if (!keys.includes(key) && key !== "result" && key !== "error") keys.push(key);
    }
    return keys;
  }

  function formatField(key, value) {
    if (value === null || value === undefined) return "-";
    if (key === "progress" && typeof value === "object") {
      return clampPercent(value.percent) + "%" + (value.message ? " - " + value.message : "");
    }
    if (key.endsWith("_at") && typeof value === "number") return formatDateTime(value);
    if (typeof value === "object") return JSON.stringify(value);
    return String(value);
  }

  function buildFieldList(keys) {
    const list = $("job-fields");
    state.detailCells.clear();
    const nodes = [];
    for (const key of keys) {
      const cell = el("dd");
      cell.dataset.field = key;
      state.detailCells.set(key, cell);
      nodes.push(el("dt", null, key), cell);
    }
    if (list) list.replaceChildren(...nodes);
  }

  function renderOutput(boxId, preId, text) {
    setHidden($(boxId), text === null);
    setText($(preId), text === null ? "" : text);
  }

  // Fills the details panel from the job map; rebuilds the <dl> only if its fields change.
  function renderDetails() {
    const job = state.jobs.get(state.selectedId);
    setHidden($("details-empty"), !!job);
    setHidden($("details-body"), !job);
    if (!job) return;
    const keys = detailFields(job);
    const key = job.id + ":" + keys.join(",");
    if (key !== state.detailKey) {
      state.detailKey = key;
      buildFieldList(keys);
    }
    for (const name of keys) setText(state.detailCells.get(name), formatField(name, job[name]));
    const hasResult = job.result !== null && job.result !== undefined;
    renderOutput("job-result-box", "job-result", hasResult ? JSON.stringify(job.result, null, 2) : null);
    const error = job.error;
    const hasError = error !== null && error !== undefined && error !== "";
    renderOutput("job-error-box", "job-error", hasError ? (typeof error === "string" ? error : JSON.stringify(error, null, 2)) : null);
  }

  /* ------------------------------------------------------- SSE per job */

  function closeSource() {
    if (state.source) state.source.close();
    state.source = null;
    state.followLost = false;
    clearTimeout(state.followTimer);
    setHidden($("details-live"), true);
  }

  /*
   * The stream broke before its terminal event. The browser's own retry could hit a
   * restarted server that no longer has the job, so we close it and reopen ourselves:
   * soon if the socket is up, else after the next queue_state confirms the job.
   */
  function onStreamLost(id) {
    closeSource();
    state.followLost = true;
    state.followFailures += 1;
    if (state.followFailures > 3 || !socketIsOpen()) return;
    state.followTimer = setTimeout(() => {
      const job = state.jobs.get(id);
      if (state.selectedId === id && job && !state.source && socketIsOpen()) followJob(id);
    }, 1000 * state.followFailures);
  }

  /*
   * Follows one job over GET /api/jobs/{id}/progress. While the WebSocket is up it
   * is the authority for status changes (it also knows about retries); the stream
   * then only feeds progress and fills in result/error.
   */
  function followJob(id) {
    closeSource();
    if (typeof EventSource === "undefined") return;
    const source = new EventSource(withToken("/api/jobs/" + id + "/progress"));
    state.source = source;
    setHidden($("details-live"), false);
    const on = (name, handler) => {
      source.addEventListener(name, (event) => {
        if (state.source !== source) return;
        const data = parseJson(event.data);
        if (data && typeof data === "object") handler(data);
      });
    };
    on("status", (data) => onStreamStatus(id, data));
    on("progress", (data) => onStreamProgress(id, data));
    on("complete", (data) => onStreamEnd(id, "completed", {
      result: data.result === undefined ? null : data.result,
      duration: data.duration,
      progress: { percent: 100, message: "Complete" },
    }));
    on("failed", (data) => onStreamEnd(id, "failed", { error: data.error }));
    on("cancelled", () => onStreamEnd(id, "cancelled", {}));
    source.onerror = () => {
      if (state.source === source) onStreamLost(id);
    };
  }

  function onStreamStatus(id, data) {
    state.followFailures = 0;
    const job = state.jobs.get(id);
    if (!job || socketIsOpen() || !STATUSES.includes(data.status)) return;
    if (FINISHED.has(job.status)) return;
    updateJob(id, data.status, { progress: data.progress || job.progress, started_at: data.started_at });
  }

  function onStreamProgress(id, data) {
    const job = state.jobs.get(id);
    if (!job || FINISHED.has(job.status)) return;
    applyProgress(id, data.percent, data.message);
  }

  function onStreamEnd(id, status, fields) {
    closeSource();
    const job = state.jobs.get(id);
    if (!job) return;
    if (!socketIsOpen() && !FINISHED.has(job.status)) {
      updateJob(id, status, Object.assign({ completed_at: nowSeconds() }, fields));
    } else if (job.status === status) {
      // Same outcome as the socket said: only fill in what it may lack.
      const missing = {};
      for (const key of ["result", "error"]) {
        if (key in fields && (job[key] === null || job[key] === undefined)) missing[key] = fields[key];
      }
      if (Object.keys(missing).length) updateJob(id, null, missing);
    }
  }

  /* ------------------------------------------------------------- start up */

  function bind(id, eventName, handler) {
    const node = $(id);
    if (node) node.addEventListener(eventName, handler);
  }

  function init() {
    bind("create-job-form", "submit", onSubmit);
    bind("job-type", "change", renderParams);
    bind("job-list", "click", onListClick);
    bind("job-list", "keydown", onListKey);
    bind("clear-completed", "click", clearCompleted);
    window.addEventListener("online", reconnectNow);
    window.addEventListener("pagehide", () => {
      closeSource();
      clearTimeout(state.reconnectTimer);
      if (state.ws) {
        state.ws.onclose = null;
        state.ws.close();
        state.ws = null;
      }
    });
    // Back from the back/forward cache: the socket was closed on pagehide.
    window.addEventListener("pageshow", (event) => {
      if (event.persisted) reconnectNow();
    });
    renderStats();
    renderEmptyState();
    renderDetails();
    loadJobTypes();
    connect();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
