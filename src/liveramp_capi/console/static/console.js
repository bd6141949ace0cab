// Delivery console: plain DOM, no framework, nothing fetched from outside the api-server.
// Every value is put on the page with textContent (never parsed as HTML).
"use strict";

(function () {
  const DAG_ID = "tiktok_conversions";
  // Days and hours: the tabs describe runs of both DAGs of the conversions pipeline.
  const DAG_IDS = [DAG_ID, "tiktok_conversions_hourly"];
  const PAGE_SIZE = 25;
  const root = document.getElementById("console");
  const view = document.body.dataset.view;
  // The Airflow UI root: the console lives at <ui root>/capi-console/...
  const uiRoot = location.pathname.split("/capi-console")[0];
  const fmt = new Intl.NumberFormat("en-US");

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value);
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }
  const svgEl = (tag, attrs) => {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    return node;
  };
  const num = (v) => (v === null || v === undefined ? "–" : fmt.format(v));
  const secs = (v) => {
    if (v === null || v === undefined) return "–";
    if (v < 90) return `${v.toFixed(1)} s`;
    if (v < 5400) return `${(v / 60).toFixed(1)} min`;
    return `${(v / 3600).toFixed(1)} h`;
  };
  const pct = (v) => (v === null || v === undefined ? "–" : `${(v * 100).toFixed(1)} %`);
  const uiLink = (href, text) => el("a", { href: uiRoot + href, target: "_top" }, text);
  const badge = (state) => el("span", { class: `badge state-${state || "unknown"}` }, state || "unknown");

  async function api(path) {
    const response = await fetch(`${uiRoot}/capi-console/api/${path}`, { credentials: "same-origin" });
    if (!response.ok) {
      const text = response.status === 401 || response.status === 403 ? "log in to Airflow to see this page" : response.statusText;
      throw new Error(`${response.status}: ${text}`);
    }
    return response.json();
  }
  function show(...nodes) {
    root.replaceChildren(...nodes.filter((node) => node !== null && node !== undefined && node !== false));
  }
  function failure(error) {
    return el("p", { class: "error", role: "alert" }, `Could not load: ${error.message}`);
  }
  function nav(active) {
    const item = (key, label) =>
      key === active ? el("strong", {}, label) : el("a", { href: `${uiRoot}/capi-console/${key}` }, label);
    return el("nav", { class: "tabs" }, item("conversions", "Partitions"), item("envelopes", "Envelope health"));
  }
  function card(label, value, hint, cls) {
    return el("div", { class: `card ${cls || ""}`, "data-metric": label }, el("div", { class: "value" }, value), el("div", { class: "label" }, label), hint ? el("div", { class: "hint" }, hint) : null);
  }
  function table(headers, rows, cls) {
    return el("table", { class: cls || "" }, el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))), el("tbody", {}, rows));
  }

  // ---- chart: bars (delivered), line (rejection rate), second panel (send duration) ----
  function chart(series) {
    const width = Math.max(600, Math.floor(root.clientWidth - 4)), height = 190, pad = 44, n = series.length;
    const step = (width - 2 * pad) / Math.max(n, 1);
    const maxDelivered = Math.max(1, ...series.map((d) => d.delivered || 0));
    const maxRate = Math.max(0.05, ...series.map((d) => d.rejection_rate || 0));
    const maxDuration = Math.max(1, ...series.map((d) => d.send_duration_seconds || 0));
    const panel = (title, legend) => {
      const svg = svgEl("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart", role: "img", "aria-label": title });
      svg.append(svgEl("line", { x1: pad, y1: height - pad, x2: width - pad, y2: height - pad, class: "axis" }));
      const t = svgEl("text", { x: pad, y: 14, class: "chart-title" });
      t.textContent = `${title}  ${legend}`;
      svg.append(t);
      return svg;
    };
    const label = (svg, x, y, text, cls) => {
      const t = svgEl("text", { x, y, class: cls || "tick" });
      t.textContent = text;
      svg.append(t);
    };
    const top = panel("Delivered events per day", "(bars; line: rejection rate)");
    const bottom = panel("Send duration", "(first send task start → last send task end)");
    const ys = (v, max) => height - pad - (v / max) * (height - 2 * pad - 10);
    let path = "";
    series.forEach((d, i) => {
      const x = pad + i * step;
      if (d.delivered !== null && d.delivered !== undefined) {
        const y = ys(d.delivered, maxDelivered);
        const bar = svgEl("rect", { x: x + 1, y, width: Math.max(1, step - 2), height: height - pad - y, class: `bar state-${d.state || "unknown"}` });
        const tip = svgEl("title");
        tip.textContent = `${d.partition}: ${num(d.delivered)} delivered, ${num(d.failed)} failed, rejection ${pct(d.rejection_rate)}`;
        bar.append(tip);
        top.append(bar);
      }
      if (d.rejection_rate !== null && d.rejection_rate !== undefined) {
        path += `${path ? "L" : "M"}${x + step / 2},${ys(d.rejection_rate, maxRate)}`;
      }
      if (d.send_duration_seconds !== null && d.send_duration_seconds !== undefined) {
        const y = ys(d.send_duration_seconds, maxDuration);
        const bar = svgEl("rect", { x: x + 1, y, width: Math.max(1, step - 2), height: height - pad - y, class: "bar duration" });
        const tip = svgEl("title");
        tip.textContent = `${d.partition}: send ${secs(d.send_duration_seconds)}`;
        bar.append(tip);
        bottom.append(bar);
      }
      if (i % Math.ceil(n / 10) === 0) {
        label(top, x, height - pad + 14, d.partition.slice(5));
        label(bottom, x, height - pad + 14, d.partition.slice(5));
      }
    });
    if (path) top.append(svgEl("path", { d: path, class: "rate" }));
    label(top, 2, pad, num(maxDelivered));
    label(top, width - pad + 4, pad, pct(maxRate), "tick rate-tick");
    label(bottom, 2, pad, secs(maxDuration));
    return el("div", { class: "charts" }, top, bottom);
  }

  // ---- failure and rerun ----
  function rerunBox(detail) {
    const rerun = detail.rerun;
    if (!rerun) return null;
    const failed = detail.failed_batches || { total: 0, batches: [] };
    return el("section", { class: "rerun", "data-testid": "rerun" },
      el("h3", {}, "What failed"),
      el("p", {}, `${num(detail.counts.failed)} events in ${num(failed.total)} failed batches` +
        (detail.counts.pending ? `, ${num(detail.counts.pending)} events not sent` : "") + "."),
      failed.batches.length ? table(["batch", "events", "HTTP status", "attempts", "error"],
        failed.batches.map((b) => el("tr", {}, el("td", { class: "mono" }, b.batch_id), el("td", {}, num(b.events)), el("td", {}, b.http_status ?? "–"), el("td", {}, num(b.attempts)), el("td", {}, b.error || "–")))) : null,
      failed.total > failed.batches.length ? el("p", { class: "muted" }, `first ${failed.batches.length} of ${num(failed.total)} shown`) : null,
      el("h3", {}, "Rerun"),
      el("p", {}, "In the UI: ", rerun.ui, ". The ledger sends only what was not acknowledged."),
      el("ul", {}, rerun.clear_tasks.map((t) => el("li", {}, uiLink(t.url, `clear ${t.task_id}${t.map_index >= 0 ? ` [${t.map_index}]` : ""}`)))),
      el("p", {}, "Or from a shell:"),
      el("pre", { class: "cli" }, rerun.cli));
  }

  function detailBlock(detail) {
    const c = detail.counts || {};
    const reasons = detail.rejected_by_reason || [];
    const tries = Array.isArray(detail.tries) ? detail.tries : [];
    const tryKeys = [...new Set(tries.flatMap((t) => Object.keys(t)))].filter((k) => typeof tries[0][k] !== "object");
    return el("div", { class: "detail" },
      el("div", { class: "cards" },
        card("received", num(c.received)), card("valid", num(c.valid)), card("rejected", num(c.rejected)),
        card("duplicates", num(c.duplicates)), card("delivered", num(c.delivered), c.delivered_this_run !== undefined ? `${num(c.delivered_this_run)} this run` : null, "good"),
        card("failed", num(c.failed), null, c.failed ? "bad" : ""), card("skipped", num(c.skipped), "envelope expired / not sent"),
        card("requests", num(c.requests)), card("retries", num(c.retries)), card("throttled (429)", num(c.throttled)),
        card("send duration", secs(detail.send_duration_seconds)), card("run duration", secs(detail.duration_seconds))),
      detail.ledger ? el("p", { class: "muted" }, `Ledger: ${num(detail.ledger.acknowledged_events)} events acknowledged, ${num(detail.ledger.failed_events)} failed, ${num(detail.ledger.in_flight_events)} in flight, ${num(detail.ledger.batches)} batches, ${num(detail.ledger.retries)} retries.`) : null,
      reasons.length ? el("div", {}, el("h3", {}, "Rejection reasons"), table(["reason", "records"], reasons.map((r) => el("tr", {}, el("td", { class: "mono" }, r.code), el("td", {}, num(r.count)))))) : null,
      tries.length ? el("div", {}, el("h3", {}, "Per try"), table(tryKeys, tries.map((t) => el("tr", {}, tryKeys.map((k) => el("td", {}, typeof t[k] === "number" ? num(t[k]) : String(t[k] ?? "–"))))))) : null,
      detail.unfinished_tasks && detail.unfinished_tasks.length ? el("p", { class: "error" }, `Unfinished tasks: ${JSON.stringify(detail.unfinished_tasks)}`) : null,
      rerunBox(detail));
  }

  // ---- views ----
  async function conversions() {
    let days = 30, offset = 0;
    const chartBox = el("div", { class: "panel" }, el("p", { class: "muted" }, "Loading chart…"));
    const listBox = el("div", { class: "panel" });
    const dayButton = (n) => el("button", { class: days === n ? "active" : "", onclick: () => { days = n; loadChart(); } }, `${n} days`);
    const head = el("div", { class: "toolbar" });
    async function loadChart() {
      head.replaceChildren(dayButton(30), dayButton(90));
      try {
        const data = await api(`daily?days=${days}`);
        chartBox.replaceChildren(chart(data.series));
      } catch (e) { chartBox.replaceChildren(failure(e)); }
    }
    async function loadPage() {
      try {
        const data = await api(`partitions?limit=${PAGE_SIZE}&offset=${offset}`);
        if (!data.partitions.length) {
          listBox.replaceChildren(el("p", { class: "empty" }, "No partition yet. Trigger tiktok_conversions with a partition (YYYY-MM-DD); its delivery appears here."));
          return;
        }
        const rows = data.partitions.flatMap((p) => {
          const c = p.counts || {};
          const detailRow = el("tr", { class: "detail-row", hidden: true }, el("td", { colspan: 13 }));
          const toggle = async () => {
            detailRow.hidden = !detailRow.hidden;
            if (!detailRow.hidden && !detailRow.dataset.loaded) {
              try {
                detailRow.firstChild.replaceChildren(detailBlock(await api(`partitions/${p.partition}`)));
                detailRow.dataset.loaded = "1";
              } catch (e) { detailRow.firstChild.replaceChildren(failure(e)); }
            }
          };
          const row = el("tr", { class: `partition state-${p.state}`, "data-partition": p.partition },
            el("td", {}, el("button", { class: "link", onclick: toggle, "aria-label": `details of ${p.partition}` }, p.partition)),
            el("td", {}, badge(p.state)),
            el("td", { class: "n" }, num(c.received)), el("td", { class: "n" }, num(c.valid)), el("td", { class: "n" }, num(c.rejected)),
            el("td", { class: "n delivered" }, num(c.delivered)), el("td", { class: "n" }, num(c.failed)), el("td", { class: "n" }, num(c.skipped)),
            el("td", {}, p.top_reasons.map((r) => el("div", { class: "reason" }, el("span", { class: "mono" }, r.code), ` ${num(r.count)}`))),
            el("td", { class: "n" }, `${num(c.retries)}${c.throttled ? ` / ${num(c.throttled)}×429` : ""}`),
            el("td", { class: "n" }, secs(p.duration_seconds)),
            el("td", {}, p.last_run ? uiLink(p.last_run.url, p.last_run.run_id) : "–"),
            el("td", {}, p.state === "failed" ? el("button", { class: "rerun-button", onclick: toggle }, "what failed / rerun") : ""));
          return p.state === "failed" ? [row, detailRow] : [row, detailRow];
        });
        const pages = Math.ceil(data.total / data.limit), current = Math.floor(data.offset / data.limit) + 1;
        listBox.replaceChildren(
          table(["partition", "state", "received", "valid", "rejected", "delivered", "failed", "skipped", "top rejection reasons", "retries / throttled", "duration", "last run", ""], rows, "partitions"),
          el("div", { class: "pager" },
            el("button", { disabled: offset === 0 ? "disabled" : null, onclick: () => { offset = Math.max(0, offset - PAGE_SIZE); loadPage(); } }, "← newer"),
            el("span", {}, `page ${current} of ${pages} · ${num(data.total)} partitions`),
            el("button", { disabled: offset + PAGE_SIZE >= data.total ? "disabled" : null, onclick: () => { offset += PAGE_SIZE; loadPage(); } }, "older →")));
      } catch (e) { listBox.replaceChildren(failure(e)); }
    }
    show(nav("conversions"), el("h1", {}, "Conversions delivery"), head, chartBox, listBox);
    await Promise.all([loadChart(), loadPage()]);
  }

  function otherDag(dagId) {
    if (dagId && !DAG_IDS.includes(dagId)) {
      show(el("p", { class: "muted" }, `This tab describes runs of ${DAG_IDS.join(" and ")}; ${dagId} is another DAG.`));
      return true;
    }
    return false;
  }

  function partitionBlock(detail) {
    return [
      el("h1", {}, `Partition ${detail.partition} `, badge(detail.state)),
      detail.summary_is_from_this_run === false && detail.counts && Object.keys(detail.counts).length ? el("p", { class: "muted" }, `The partition's summary was written by run ${detail.summary_run_id || "another run"}.`) : null,
      detail.counts ? detailBlock(detail) : el("p", { class: "muted" }, "No summary yet for this run."),
      dryRunBlock(detail.dry_run_summary),
    ];
  }

  // The last dry run of the partition: what a real run would send; it sent nothing.
  function dryRunBlock(summary) {
    if (!summary || !summary.dry_run) return null;
    return el("p", { class: "muted" },
      `Last dry run (sent nothing): ${summary.status}, ${fmt.format(summary.planned_events || 0)} events in ` +
      `${fmt.format(summary.planned_batches || 0)} batches planned, ${fmt.format(summary.rejected || 0)} rejected; ` +
      "plan in dry_run/plan.jsonl.");
  }

  async function run() {
    const params = new URLSearchParams(location.search);
    const runId = params.get("run_id");
    if (otherDag(params.get("dag_id"))) return;
    if (!runId) { show(el("p", { class: "error" }, "No run given.")); return; }
    try {
      const dagId = params.get("dag_id");
      show(...partitionBlock(await api(`runs/${encodeURIComponent(runId)}${dagId ? `?dag_id=${encodeURIComponent(dagId)}` : ""}`)));
    } catch (e) { show(failure(e)); }
  }

  function shardBlock(detail) {
    const task = detail.task || {}, result = detail.shard_result;
    const failed = detail.shard_failed_batches || { total: 0, batches: [] };
    const skip = new Set(["shard", "shard_count", "partition"]);
    const numbers = Object.entries(result || {}).filter(([k, v]) => typeof v === "number" && !skip.has(k));
    return el("section", { class: "shard", "data-testid": "shard" },
      el("h1", {}, `send [${task.map_index}]`, result ? ` · shard ${result.shard} of ${result.shard_count}` : "", " ", badge(task.state)),
      result ? el("div", { class: "cards" }, numbers.map(([k, v]) => card(k.replaceAll("_", " "), num(v), null, k.startsWith("failed") && v ? "bad" : ""))) : el("p", { class: "muted" }, "This task's counters are not on storage (not reported yet, or purged)."),
      failed.total ? el("div", {}, el("h3", {}, `Failed batches of this shard (${num(failed.total)})`),
        table(["batch", "events", "HTTP status", "attempts", "error"], failed.batches.map((b) => el("tr", {}, el("td", { class: "mono" }, b.batch_id), el("td", {}, num(b.events)), el("td", {}, b.http_status ?? "–"), el("td", {}, num(b.attempts)), el("td", {}, b.error || "–"))))) : null,
      task.state === "failed" && detail.rerun ? el("p", {}, "Rerun just this shard: ", uiLink(task.url, "open this task"), ", press Clear (keep Downstream, so report runs again). Or: ", el("code", {}, detail.rerun.cli)) : null);
  }

  async function task() {
    const params = new URLSearchParams(location.search);
    if (otherDag(params.get("dag_id"))) return;
    const query = new URLSearchParams({ run_id: params.get("run_id") || "", task_id: params.get("task_id") || "", map_index: params.get("map_index") || "-1" });
    if (params.get("dag_id")) query.set("dag_id", params.get("dag_id"));
    try {
      const detail = await api(`task?${query}`);
      show(detail.shard_result !== undefined ? shardBlock(detail) : null, ...partitionBlock(detail));
    } catch (e) { show(failure(e)); }
  }

  async function envelopes() {
    try {
      const h = await api("envelopes");
      const lifetimes = h.lifetimes_days;
      const lastBucket = Math.max(0, ...h.histogram.map((b) => b.age_from_days));
      const buckets = [];
      for (let from = 0; from <= lastBucket; from += 5) buckets.push(from);
      const cell = (lifetime, from) => (h.histogram.find((b) => b.lifetime_days === lifetime && b.age_from_days === from) || {}).envelopes || 0;
      const maxCell = Math.max(1, ...h.histogram.map((b) => b.envelopes));
      const bars = buckets.map((from) => el("tr", {},
        el("th", {}, `${from}–${from + 5} days`),
        lifetimes.map((lifetime) => {
          const n = cell(lifetime, from);
          const over = from >= lifetime;
          return el("td", {}, el("div", { class: `hbar ${over ? "over" : ""}`, style: `width:${Math.round((n / maxCell) * 80)}%` }), num(n));
        })));
      const last = h.last_refresh, lastRun = h.last_refresh_run;
      show(nav("envelopes"), el("h1", {}, "Envelope health"),
        el("div", { class: "cards" },
          card("envelopes stored", num(h.total)), card("due for refresh", num(h.due_for_refresh), `under ${Math.round(h.remaining_share * 100)}% of their lifetime left`),
          card("expired", num(h.expired), null, h.expired ? "bad" : ""), card("consent missing", num(h.consent_missing), "skipped by the refresh"),
          ...Object.entries(h.by_state).map(([state, n]) => card(`state: ${state}`, num(n)))),
        el("h3", {}, "Age since issue, by lifetime (red: past the lifetime)"),
        h.histogram.length ? table(["age", ...lifetimes.map((d) => `lifetime ${d} days`)], bars, "histogram") : el("p", { class: "empty" }, "The envelope store is empty."),
        el("h3", {}, "Last refresh run"),
        lastRun ? el("p", {}, uiLink(lastRun.url, lastRun.run_id), " ", badge(lastRun.state)) : el("p", { class: "muted" }, "ats_envelope_refresh has not run yet."),
        last ? el("div", { class: "cards" },
          card("run date", last.run_date), card("status", last.status || "–"), card("selected", num(last.selected)),
          card("refreshed", num(last.refreshed), null, "good"), card("failed", num(last.failed), null, last.failed ? "bad" : ""),
          card("skipped for consent", num(last.skipped_consent)), card("newly expired", num(last.newly_expired)),
          card("retries", num(last.retries))) : null,
        last && last.failed_by_reason && Object.keys(last.failed_by_reason).length ? table(["failure reason", "envelopes"], Object.entries(last.failed_by_reason).map(([r, n]) => el("tr", {}, el("td", { class: "mono" }, r), el("td", {}, num(n))))) : null);
    } catch (e) { show(nav("envelopes"), failure(e)); }
  }

  ({ conversions, run, task, envelopes }[view] || conversions)();
})();
