// 오로라's page: streams /v1/chat/completions (SSE over fetch), lists and deletes /v1/memory. No dependencies.
"use strict";
const $ = (id) => document.getElementById(id);
const MODEL = "oh-lora";

function setting(id, fallback) {
  const input = $(id);
  input.value = localStorage.getItem("ohlora." + id) || fallback();
  input.addEventListener("change", () => { localStorage.setItem("ohlora." + id, input.value.trim()); refresh(); });
  localStorage.setItem("ohlora." + id, input.value);
  return () => input.value.trim();
}
const user = setting("user", () => "web-" + Math.random().toString(36).slice(2, 10));
const key = setting("key", () => "");
let model = MODEL;

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  if (key()) h["Authorization"] = "Bearer " + key();
  return h;
}

function bubble(kind, text) {
  const li = document.createElement("li");
  li.className = kind;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  li.appendChild(body);
  $("log").appendChild(li);
  li.scrollIntoView({block: "end"});
  return li;
}

function note(li, text) {
  const span = document.createElement("span");
  span.className = "note";
  span.textContent = text;
  li.appendChild(span);
}

async function errorText(response) {
  try {
    return (await response.json()).error.message;
  } catch (e) {
    return response.status + " " + response.statusText;
  }
}

async function refresh() {
  if (!user()) return;
  const r = await fetch("/v1/memory?user=" + encodeURIComponent(user()), {headers: headers(false)});
  const list = $("memories");
  list.replaceChildren();
  if (!r.ok) { $("status").textContent = "memory: " + await errorText(r); return; }
  const items = (await r.json()).items;
  $("empty").hidden = items.length > 0;
  for (const item of items) {
    const li = document.createElement("li");
    const text = document.createElement("span");
    text.className = "item";
    text.textContent = item;
    const del = document.createElement("button");
    del.className = "delete";
    del.type = "button";
    del.title = "delete " + item;
    del.textContent = "삭제";
    del.addEventListener("click", () => forget(item));
    li.append(text, del);
    list.appendChild(li);
  }
}

async function forget(item) {
  const itemKey = item.slice(1, item.indexOf(":"));       // "[key: value]": the key has no colon
  const r = await fetch("/v1/memory?user=" + encodeURIComponent(user()) + "&key=" + encodeURIComponent(itemKey),
                        {method: "DELETE", headers: headers(false)});
  if (!r.ok) $("status").textContent = "delete: " + await errorText(r);
  refresh();
}

async function send(message) {
  bubble("user", message);
  const li = bubble("bot", "");
  const text = li.querySelector(".text");
  $("send").disabled = true;
  $("status").textContent = "…";
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(true),
      body: JSON.stringify({model, user: user(), stream: true, messages: [{role: "user", content: message}],
                            stream_options: {include_usage: true}}),
    });
    if (!r.ok) { li.className = "error"; text.textContent = await errorText(r); return; }
    const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "", finish = null, usage = null;
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += value;
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) { li.className = "error"; note(li, chunk.error.message); continue; }
        if (chunk.memory && chunk.memory.used) {
          note(li, "memory used: " + chunk.memory.used.item + " (cosine " + chunk.memory.used.cosine.toFixed(2) + ")");
        }
        if (chunk.memory && chunk.memory.stored) {
          for (const item of chunk.memory.stored) note(li, "remembered: " + item);
        }
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          if (choice.delta && choice.delta.content) text.textContent += choice.delta.content;
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    }
    li.dataset.finish = finish || "";
    $("status").textContent = usage ? usage.completion_tokens + " tokens (" + finish + ")" : "";
  } catch (e) {
    li.className = "error";
    text.textContent = String(e);
  } finally {
    $("send").disabled = false;
    refresh();
  }
}

$("form").addEventListener("submit", (event) => {
  event.preventDefault();
  const message = $("message").value.trim();
  if (!message) return;
  $("message").value = "";
  send(message);
});
$("clear").addEventListener("click", async () => {
  const r = await fetch("/v1/memory?user=" + encodeURIComponent(user()), {method: "DELETE", headers: headers(false)});
  if (!r.ok) $("status").textContent = "delete: " + await errorText(r);
  refresh();
});
fetch("/v1/models", {headers: headers(false)}).then((r) => r.ok ? r.json() : null).then((m) => {
  if (m && m.data.length) model = m.data[0].id;
});
refresh();
