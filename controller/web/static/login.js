"use strict";
document.getElementById("login").addEventListener("submit", async (event) => {
  event.preventDefault();
  const error = document.getElementById("error");
  error.textContent = "";
  const body = { user: document.getElementById("user").value, password: document.getElementById("password").value };
  try {
    const r = await fetch("/api/login", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body), credentials: "same-origin" });
    if (r.ok) { window.location.assign("/"); return; }
    const answer = await r.json().catch(() => ({ errors: [`HTTP ${r.status}`] }));
    error.textContent = (answer.errors || [`HTTP ${r.status}`]).join("; ");
  } catch (e) {
    error.textContent = `cannot reach the controller: ${e}`;
  }
});
