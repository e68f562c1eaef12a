// The inspector page's script: builds the page from the JSON block #run-data (inspector/page.py).
// Plain DOM, no framework, no network.
"use strict";

const DATA = JSON.parse(document.getElementById("run-data").textContent);
const app = document.getElementById("app");
const tip = document.getElementById("tip");

function el(tag, attrs, ...kids) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const kid of kids.flat()) {
    if (kid === null || kid === undefined) continue;
    node.append(kid instanceof Node ? kid : String(kid));
  }
  return node;
}

function fmt(v) {
  if (v === null || v === undefined) return "-";
  if (typeof v !== "number") return String(v);
  if (v !== 0 && (Math.abs(v) >= 1e5 || Math.abs(v) < 1e-3)) return v.toExponential(3);
  return String(+v.toPrecision(5));
}

// ------------------------------------------------------------------ tooltip
function showTip(event, text) {
  tip.textContent = text;
  tip.style.display = "block";
  const x = Math.min(event.clientX + 14, window.innerWidth - tip.offsetWidth - 8);
  const y = Math.min(event.clientY + 14, window.innerHeight - tip.offsetHeight - 8);
  tip.style.left = Math.max(x, 0) + "px";
  tip.style.top = Math.max(y, 0) + "px";
}
function hideTip() { tip.style.display = "none"; }

// ------------------------------------------------------------------ colors
// Signed quantities: red above 0, blue below, strength |v| / the largest |v| shown.
// Unsigned ones: orange by v / the largest v shown. Clip: blue lower, red upper.
function diverging(v, max) {
  if (v === null || max === 0) return "";
  const a = Math.min(Math.abs(v) / max, 1) * 0.85;
  return v >= 0 ? `rgba(214, 39, 40, ${a})` : `rgba(31, 119, 180, ${a})`;
}
function sequential(v, max) {
  if (v === null || max === 0) return "";
  return `rgba(255, 127, 14, ${Math.min(Math.abs(v) / max, 1) * 0.85})`;
}

const GRPO_QUANTITIES = {
  adv: { label: "advantage x loss mask", scale: diverging,
         value: (c, t) => (c.values.loss_mask && c.values.loss_mask[t] ? c.advantage : null) },
  ratio: { label: "ratio (log scale)", scale: diverging,
           value: (c, t) => (c.values.ratio && c.values.ratio[t] > 0 ? Math.log(c.values.ratio[t]) : null) },
  clip: { label: "clip active (blue low, red high)", scale: (v) => (v > 0 ? "rgba(214, 39, 40, 0.7)" : v < 0 ? "rgba(31, 119, 180, 0.7)" : ""),
          value: (c, t) => (c.values.clip ? c.values.clip[t] : null) },
  kl: { label: "KL term", scale: diverging, value: (c, t) => (c.values.kl ? c.values.kl[t] : null) },
  entropy: { label: "entropy", scale: sequential, value: (c, t) => (c.values.entropy ? c.values.entropy[t] : null) },
  logp: { label: "-log-prob (surprise)", scale: sequential,
          value: (c, t) => (c.values.logp && c.values.logp[t] !== null ? -c.values.logp[t] : null) },
};

// ------------------------------------------------------------------ curves
function chart(name, steps, values, onRemove) {
  const W = 320, H = 130, P = 56;  // P: the left margin, room for the value labels
  const pts = steps.map((s, i) => [s, values[i]]).filter(([s, v]) => s !== null && v !== null);
  const box = el("div", { class: "chart", "data-metric": name },
                 el("div", { class: "title" }, name), el("button", { title: "remove", onclick: onRemove }, "x"));
  if (!pts.length) { box.append(el("div", { class: "note" }, "no values")); return box; }
  const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  const sx = (x) => P + (x1 === x0 ? 0.5 : (x - x0) / (x1 - x0)) * (W - P - 6);
  const sy = (y) => H - 16 - (y1 === y0 ? 0.5 : (y - y0) / (y1 - y0)) * (H - 26);
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", W); svg.setAttribute("height", H);
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("points", pts.map(([x, y]) => `${sx(x)},${sy(y)}`).join(" "));
  line.setAttribute("fill", "none"); line.setAttribute("stroke", "#1f77b4"); line.setAttribute("stroke-width", "1.5");
  svg.append(line);
  const label = (x, y, text, anchor) => {
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", x); t.setAttribute("y", y); t.setAttribute("font-size", "10");
    t.setAttribute("text-anchor", anchor); t.textContent = text; svg.append(t);
  };
  label(P - 3, 12, fmt(y1), "end"); label(P - 3, H - 16, fmt(y0), "end");
  label(P, H - 3, `step ${x0}`, "start"); label(W - 6, H - 3, `${x1}`, "end");
  if (pts.length === 1) {
    const dot = document.createElementNS(ns, "circle");
    dot.setAttribute("cx", sx(xs[0])); dot.setAttribute("cy", sy(ys[0])); dot.setAttribute("r", 3);
    dot.setAttribute("fill", "#1f77b4"); svg.append(dot);
  }
  svg.addEventListener("mousemove", (e) => {
    const r = svg.getBoundingClientRect();
    let best = 0;
    pts.forEach((p, i) => { if (Math.abs(sx(p[0]) - (e.clientX - r.left)) < Math.abs(sx(pts[best][0]) - (e.clientX - r.left))) best = i; });
    showTip(e, `${name}\nstep ${pts[best][0]}: ${fmt(pts[best][1])}`);
  });
  svg.addEventListener("mouseleave", hideTip);
  box.append(svg);
  return box;
}

const DEFAULT_CURVES = ["reward", "accuracy/mean", "format/mean", "reward_std", "frac_reward_zero_std", "kl",
                        "completion_length/mean", "loss", "grad_norm", "eval/accuracy", "eval/format"];

function curves(section) {
  const { steps, series } = section.metrics;
  const names = Object.keys(series);
  const grid = el("div", { class: "charts" });
  const shown = new Set(DEFAULT_CURVES.filter((n) => n in series));
  const draw = () => {
    grid.replaceChildren(...[...shown].map((n) => chart(n, steps, series[n], () => { shown.delete(n); draw(); })));
  };
  const pick = el("select", { class: "add-metric" }, el("option", { value: "" }, "add a curve..."),
                  names.map((n) => el("option", { value: n }, n)));
  pick.addEventListener("change", () => { if (pick.value) { shown.add(pick.value); pick.value = ""; draw(); } });
  draw();
  if (!names.length) return el("p", { class: "note" }, "no metrics.jsonl rows yet");
  return el("div", {}, el("div", { class: "controls" }, pick), grid);
}

// ------------------------------------------------------------------ GRPO groups
function tokenTip(rec, c, t) {
  const lines = [`token ${t}: ${JSON.stringify(c.tokens[t])}`];
  for (const [k, vals] of Object.entries(c.values)) lines.push(`${k.padEnd(10)} ${fmt(vals[t])}`);
  lines.push(`advantage  ${fmt(c.advantage)}`);
  if (c.why[t]) lines.push(`out of the loss: ${c.why[t]}`);
  return lines.join("\n");
}

function renderTokens(rec, c, quantity, max) {
  const q = GRPO_QUANTITIES[quantity];
  // The response prefix ended the prompt: shown where the reply starts, in no color, not trained.
  const prefix = rec.prefix ? [el("span", { class: "prefix", title: "response prefix: prompt text the rewards read in front of the reply, not trained" }, rec.prefix)] : [];
  return el("div", { class: "tokens" }, prefix, c.tokens.map((text, t) => {
    const v = q.value(c, t);
    const span = el("span", { class: "tok" + (c.why[t] ? " out" : ""), "data-t": t }, text);
    span.style.background = q.scale(v, max);
    span.addEventListener("mouseover", (e) => showTip(e, tokenTip(rec, c, t)));
    span.addEventListener("mousemove", (e) => showTip(e, tokenTip(rec, c, t)));
    span.addEventListener("mouseleave", hideTip);
    return span;
  }));
}

function groupTable(rec, quantity) {
  const q = GRPO_QUANTITIES[quantity];
  let max = 0;
  for (const c of rec.completions) c.tokens.forEach((_, t) => { const v = q.value(c, t); if (v !== null) max = Math.max(max, Math.abs(v)); });
  const order = rec.completions.map((c, i) => i).sort((a, b) => rec.completions[b].reward - rec.completions[a].reward);
  const rewards = rec.completions.map((c) => c.reward);
  const mean = rewards.reduce((a, b) => a + b, 0) / rewards.length;
  const head = el("tr", {}, el("th", {}, "#"), el("th", {}, "reward"), el("th", {}, "advantage"),
                  rec.reward_names.map((n) => el("th", {}, n)), el("th", {}, "tokens"),
                  el("th", {}, `completion, colored by ${q.label}`));
  const rows = order.map((i) => {
    const c = rec.completions[i];
    return el("tr", { class: "completion" }, el("td", { class: "num" }, i), el("td", { class: "num" }, fmt(c.reward)),
              el("td", { class: "num" }, fmt(c.advantage)), c.rewards.map((v) => el("td", { class: "num" }, fmt(v))),
              el("td", { class: "num" }, c.tokens.length + (c.truncated ? " (cut)" : "")),
              el("td", {}, renderTokens(rec, c, quantity, max)));
  });
  const spread = Math.max(...rewards) - Math.min(...rewards);
  return el("div", { class: "group" },
            el("h3", {}, `group ${rec.group}: ${rec.problem}`),
            el("div", { class: "note" }, `gold answer ${JSON.stringify(rec.answer)}; reward mean ${fmt(mean)}, spread ${fmt(spread)}`,
               spread === 0 ? " (every reward equal: advantage 0, no signal from this group)" : "",
               `; color scale: |value| up to ${fmt(max)}`),
            el("table", {}, head, rows));
}

// ------------------------------------------------------------------ SFT rows
function sftRow(rec) {
  let max = 0;
  for (const v of rec.nll) if (v !== null) max = Math.max(max, v);
  const spans = rec.tokens.map((text, t) => {
    const v = rec.nll[t];
    const cls = "tok" + (v === null ? " out" : "") + (t > 0 && rec.doc[t] !== rec.doc[t - 1] ? " doc-start" : "");
    const span = el("span", { class: cls, "data-t": t }, text);
    span.style.background = sequential(v, max);
    const say = () => `token ${t}: ${JSON.stringify(text)}\ndocument ${rec.doc[t]}\nloss (NLL) ${fmt(v)}` +
      (v === null ? "\nout of the loss: not a trained token" : "");
    span.addEventListener("mouseover", (e) => showTip(e, say()));
    span.addEventListener("mousemove", (e) => showTip(e, say()));
    span.addEventListener("mouseleave", hideTip);
    return span;
  });
  const docs = new Set(rec.doc).size;
  return el("div", { class: "group" }, el("h3", {}, `packed row ${rec.row}: ${rec.tokens.length} tokens, ${docs} documents`),
            el("div", { class: "note" }, `colored by per-token loss, up to ${fmt(max)}; a green bar starts a document`),
            el("div", { class: "tokens" }, spans));
}

// ------------------------------------------------------------------ per-step records
function records(section) {
  const steps = Object.keys(section.records);
  if (!steps.length) return el("p", { class: "note" }, "no per-token records (they are kept every --train.sample_every steps)");
  const out = el("div", { class: "records" });
  const stepPick = el("select", { class: "step" }, steps.map((s) => el("option", { value: s }, `step ${s}`)));
  stepPick.value = steps[steps.length - 1];
  const controls = el("div", { class: "controls" }, el("label", {}, "step ", stepPick));
  let quantityPick = null;
  if (section.kind === "grpo") {
    quantityPick = el("select", { class: "quantity" },
                      Object.entries(GRPO_QUANTITIES).map(([k, q]) => el("option", { value: k }, q.label)));
    controls.append(el("label", {}, "color by ", quantityPick));
  }
  const body = el("div", {});
  const draw = () => {
    const recs = section.records[stepPick.value];
    body.replaceChildren(...recs.map((r) => (r.kind === "grpo" ? groupTable(r, quantityPick.value) : sftRow(r))));
  };
  stepPick.addEventListener("change", draw);
  if (quantityPick) quantityPick.addEventListener("change", draw);
  draw();
  out.append(controls);
  if (section.left_out.length) out.append(el("p", { class: "note" }, `steps left out to keep the page small: ${section.left_out.join(", ")}`));
  out.append(body);
  return out;
}

// ------------------------------------------------------------------ evaluation samples
function evals(section) {
  const steps = Object.keys(section.evals);
  if (!steps.length) return el("p", { class: "note" }, "no held-out evaluation samples");
  const pick = el("select", { class: "eval-step" }, steps.map((s) => el("option", { value: s }, `step ${s}`)));
  pick.value = steps[steps.length - 1];
  const body = el("div", {});
  const verdict = (v) => (v === null || v === undefined ? el("span", {}, "-") : el("span", { class: v > 0 ? "ok" : "bad" }, v > 0 ? "yes" : "no"));
  const draw = () => {
    const rows = section.evals[pick.value];
    const correct = rows.filter((r) => r.accuracy > 0).length;
    body.replaceChildren(
      el("div", { class: "note" }, `${correct} of ${rows.length} correct`),
      el("table", {}, el("tr", {}, el("th", {}, "problem"), el("th", {}, "gold"), el("th", {}, "correct"),
                         el("th", {}, "format"), el("th", {}, "completion")),
         rows.map((r) => el("tr", {}, el("td", { class: "text" }, r.problem), el("td", { class: "text" }, r.answer),
                             el("td", {}, verdict(r.accuracy)), el("td", {}, verdict(r.format)),
                             el("td", { class: "text" }, r.completion)))));
  };
  pick.addEventListener("change", draw);
  draw();
  return el("div", {}, el("div", { class: "controls" }, el("label", {}, "evaluation at ", pick)), body);
}

// ------------------------------------------------------------------ the page
app.append(el("h1", {}, `inspect: ${DATA.title}`));
for (const section of DATA.sections) {
  app.append(el("h2", {}, `${section.name} (${section.kind})`),
             el("h3", {}, "curves"), curves(section),
             el("h3", {}, section.kind === "grpo" ? "groups, token by token" : "packed rows, token by token"), records(section),
             el("h3", {}, "held-out evaluation"), evals(section));
}
