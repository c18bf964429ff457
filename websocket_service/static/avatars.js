// The avatar panel: engine status, a picker of prepared avatars, and an upload with a
// progress bar (upload, then the preparation job). State lives on window.__manage for tests.

import { authFetch, TOKEN } from "./auth.js";

const $ = (id) => document.getElementById(id);
const manage = (window.__manage = { status: null, avatars: [], progress: [], job: null });
const UPLOAD_SHARE = 30; // percent of the bar for the upload; the rest is the preparation

async function json(url, init) {
  const r = await authFetch(url, init);
  const body = await r.json();
  if (!r.ok) throw new Error(`${body.code}: ${body.message}`);
  return body;
}

/** A valid avatar id from a file name: letters, digits, '-' and '_', at most 64. */
export function avatarIdFor(fileName) {
  const stem = fileName.replace(/\.[^.]*$/, "").replace(/[^A-Za-z0-9_-]+/g, "-");
  return stem.replace(/^-+|-+$/g, "").slice(0, 64) || "avatar";
}

export class AvatarPanel {
  constructor({ userId, log }) {
    Object.assign(this, { userId, log });
    $("file").onchange = () => { $("upload").disabled = !$("file").files.length || this.busy; };
    $("upload").onclick = () => this.upload($("file").files[0]);
  }

  /** The avatar the next session should use. */
  get selected() { return $("avatar").value || null; }

  async refresh(select) {
    try {
      const [status, list] = await Promise.all([
        json("/api/webrtc/musetalk/status"), json("/avatars")]);
      manage.status = status;
      manage.avatars = list.avatars.map((a) => a.avatar_id);
      this._showStatus(status);
      this._fill(manage.avatars, select ?? this.selected ?? status.current_avatar);
    } catch (err) {
      $("engineStatus").textContent = `status unavailable (${err.message})`;
      this.log(`avatar status: ${err.message}`, "error");
    }
  }

  _showStatus(st) {
    const parts = [`engine ${st.engine}`, st.initialized ? "loaded" : "not loaded",
      `${st.loaded_avatars.length} in memory`];
    $("engineStatus").textContent = parts.join(" · ");
    const demo = $("demoMode");
    demo.hidden = !st.demo_mode;
    demo.title = st.demo_reason || "";
  }

  _fill(ids, want) {
    const sel = $("avatar");
    sel.replaceChildren(...ids.map((id) => new Option(id, id)));
    if (want && ids.includes(want)) sel.value = want;
  }

  _progress(percent, text) {
    $("progressRow").hidden = false;
    $("progress").value = percent;
    $("progressText").textContent = text;
    manage.progress.push(Math.round(percent));
  }

  _send(file, avatarId) {
    return new Promise((ok, fail) => {
      const xhr = new XMLHttpRequest();
      const url = `/prepare_avatar/${encodeURIComponent(this.userId)}?avatar_id=${encodeURIComponent(avatarId)}`;
      xhr.open("POST", url);
      if (TOKEN) xhr.setRequestHeader("Authorization", `Bearer ${TOKEN}`);
      xhr.upload.onprogress = (e) => {
        if (e.lengthComputable) this._progress((UPLOAD_SHARE * e.loaded) / e.total, `uploading ${Math.round((100 * e.loaded) / e.total)}%`);
      };
      xhr.onload = () => {
        let body = {};
        try { body = JSON.parse(xhr.responseText); } catch { /* not JSON */ }
        if (xhr.status === 202) ok(body);
        else fail(new Error(body.code ? `${body.code}: ${body.message}` : `HTTP ${xhr.status}`));
      };
      xhr.onerror = () => fail(new Error("upload failed (network)"));
      const form = new FormData();
      form.append("file", file);
      xhr.send(form);
    });
  }

  async _follow(job) {
    for (;;) {
      manage.job = job;
      if (job.status === "done") return job;
      if (job.status === "failed") throw new Error(`${job.error.code}: ${job.error.message}`);
      this._progress(UPLOAD_SHARE + (100 - UPLOAD_SHARE) * job.progress, `preparing: ${job.message || job.status}`);
      await new Promise((r) => setTimeout(r, 300));
      job = await json(job.status_url);
    }
  }

  async upload(file) {
    if (!file) return;
    const avatarId = avatarIdFor(file.name);
    this.busy = true; $("upload").disabled = true; manage.progress = []; manage.job = null;
    this.log(`uploading ${file.name} as avatar ${avatarId}`);
    try {
      const job = await this._follow(await this._send(file, avatarId));
      this._progress(100, "ready");
      this.log(`avatar ${job.avatar_id} is ready`, "event");
      await this.refresh(job.avatar_id);
    } catch (err) {
      $("progressText").textContent = `failed: ${err.message}`;
      this.log(`avatar upload: ${err.message}`, "error");
    } finally {
      this.busy = false; $("upload").disabled = !$("file").files.length;
    }
  }
}
