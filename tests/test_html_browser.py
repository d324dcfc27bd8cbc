"""The HTML report in a real headless browser (Debian's chromium): it loads without console
errors, clicking a heatmap cell or a table row shows that pair, the failures-only filter and
sorting work. `.ci/run` installs chromium; outside CI the test is skipped without one."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from aprtrace import report
from aprtrace.diff import Tolerance, diff_dirs
from test_diff import make_dump

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# Installed first in <head>: records uncaught errors and console.error calls.
CAPTURE = """<script>
window.__errors = [];
window.addEventListener('error', function(e){ window.__errors.push(String(e.message)); });
const __consoleError = console.error;
console.error = function(){ window.__errors.push(Array.from(arguments).join(' '));
  __consoleError.apply(console, arguments); };
</script>"""

# Run after the report's own script: act as a user would and write what the page shows.
ACTIONS = """<script>
(function(){
  const out = {errors: window.__errors};
  const details = document.getElementById('details');
  out.initial = details.dataset.path;
  const cell = document.querySelector('.cell[data-i="PAIR"]');
  cell.dispatchEvent(new MouseEvent('click', {bubbles: true}));
  out.after_cell_click = details.dataset.path;
  out.details_text = details.textContent;
  const row = document.querySelector('#pairs tr[data-i="ROW"]');
  row.dispatchEvent(new MouseEvent('click', {bubbles: true}));
  out.after_row_click = details.dataset.path;
  const visible = function(){ return Array.from(document.querySelectorAll('#pairs tbody tr'))
    .filter(function(tr){ return tr.style.display !== 'none'; }).length; };
  out.rows_before = visible();
  const box = document.getElementById('only-failures');
  box.checked = true;
  box.dispatchEvent(new Event('change'));
  out.rows_filtered = visible();
  out.row_count_text = document.getElementById('row-count').textContent;
  box.checked = false;
  box.dispatchEvent(new Event('change'));
  out.rows_after = visible();
  const header = document.querySelector('#pairs th[data-col="3"]');  // rel L2
  header.dispatchEvent(new MouseEvent('click', {bubbles: true}));
  header.dispatchEvent(new MouseEvent('click', {bubbles: true}));  // descending
  out.first_sorted = document.querySelector('#pairs tbody tr').dataset.i;
  out.errors_end = window.__errors;
  const pre = document.createElement('pre');
  pre.id = 'test-result';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
})();
</script>"""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed; .ci/run installs it (apt-get install chromium)")
    pytest.skip("chromium is not installed (CI installs it)")


def run_page(page: str, tmp_path) -> dict:
    path = tmp_path / "report.html"
    path.write_text(page, encoding="utf-8")
    cmd = [
        chromium(),
        *CHROMIUM_FLAGS,
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=10000",
        "--dump-dom",
        path.as_uri(),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    match = re.search(r'<pre id="test-result">(.*?)</pre>', done.stdout, re.S)
    assert match, (done.returncode, done.stderr[-2000:])
    text = match.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">")
    return json.loads(text.replace("&amp;", "&"))


def test_report_works_in_a_real_browser(tmp_path):
    stages = ["embedding", "attn_norm", "q_post_rope", "k_post_rope", "attn_scores"]
    a = make_dump(tmp_path / "a", {0: stages, 1: stages[1:]})
    b = make_dump(
        tmp_path / "b",
        {0: stages, 1: stages[1:]},
        scale={"layer-1/attn_scores": 1.04, "lm_head": 1.5},
    )
    d = diff_dirs(a, b, Tolerance(atol=1e-6, rtol=0.01))
    page = report.html_report(d)
    pair = next(i for i, p in enumerate(d.pairs) if p.key.rel == "layer-0/attn_norm.bin")
    row = next(i for i, p in enumerate(d.pairs) if p.key.rel == "final_norm.bin")
    failing = sum(1 for p in d.pairs if not p.passed)
    assert 0 < failing < len(d.pairs)
    page = page.replace("<head>", "<head>" + CAPTURE, 1)
    actions = ACTIONS.replace("PAIR", str(pair)).replace("ROW", str(row))
    page = page.replace("</body>", actions + "</body>", 1)
    out = run_page(page, tmp_path)
    assert out["errors"] == [] and out["errors_end"] == []
    assert out["initial"] == d.first_divergence.key.rel  # opens on the first divergence
    assert out["after_cell_click"] == "layer-0/attn_norm.bin"
    assert "token 0, channel" in out["details_text"] or "identical" in out["details_text"]
    assert out["after_row_click"] == "final_norm.bin"
    assert out["rows_before"] == len(d.pairs) == out["rows_after"]
    assert out["rows_filtered"] == failing
    assert out["row_count_text"] == f"{failing} of {len(d.pairs)} rows shown"
    worst = max(range(len(d.pairs)), key=lambda i: d.pairs[i].stats.rel_l2)
    assert out["first_sorted"] == str(worst)


def test_a_script_error_would_be_caught(tmp_path):
    # The harness itself: a page whose script throws must not pass as clean.
    stages = ["embedding", "attn_norm"]
    a = make_dump(tmp_path / "a", {0: stages})
    page = report.html_report(diff_dirs(a, a))
    page = page.replace("<head>", "<head>" + CAPTURE, 1)
    page = page.replace("const data = JSON.parse", "undefinedFunction(); const data = JSON.parse")
    actions = (
        "<script>const pre = document.createElement('pre'); pre.id = 'test-result';"
        "pre.textContent = JSON.stringify({errors: window.__errors});"
        "document.body.appendChild(pre);</script>"
    )
    out = run_page(page.replace("</body>", actions + "</body>", 1), tmp_path)
    assert out["errors"] and "undefinedFunction" in out["errors"][0]
