"""The live engine page of a real ``pagedserve serve`` of the bundled model: the KV capacity it
logs is what ``pagedserve plan`` predicts, the state endpoint needs the API key and follows the
requests, and the page, in a real headless Chromium, draws the block grid filling while
requests run and all free (no block in use) when they end."""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
from server_process import API_KEY, ENGINE_ARGS, Server, free_port, start_server

from pagedserve.plan.estimate import PlanRequest, make_plan

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    command = [sys.executable, "-m", "pagedserve", "serve", "pagedserve/tiny-py"]
    log = tmp_path_factory.mktemp("dashboard") / "server.log"
    server = start_server(command, log, free_port(), "--api-key", API_KEY)
    yield server
    server.stop()


def state(server: Server) -> dict:
    response = httpx2.get(f"{server.url}/dashboard/state", headers=AUTH, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def run_requests(server: Server, prompts: list[str], max_tokens: int) -> threading.Thread:
    """Stream completions of ``prompts`` at once from a background thread."""

    def one(prompt: str) -> None:
        body = {"model": "pagedserve/tiny-py", "prompt": prompt, "max_tokens": max_tokens,
                "ignore_eos": True, "stream": True}
        with httpx2.stream("POST", f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=120) as r:
            assert r.status_code == 200
            for _ in r.iter_lines():
                pass

    def run_all() -> None:
        threads = [threading.Thread(target=one, args=(p,)) for p in prompts]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    runner = threading.Thread(target=run_all)
    runner.start()
    return runner


def test_the_plan_predicts_the_kv_capacity_serve_logs(server: Server) -> None:
    logged = re.search(r"KV cache: (\d+) blocks of (\d+) tokens = (\d+) tokens; max concurrency at "
                       r"max_model_len=(\d+): ([\d.]+)x", server.log.read_text())
    assert logged, server.log.read_text()
    plan = make_plan(PlanRequest("pagedserve/tiny-py", device="cpu", bandwidth_gb_per_s=1.0, **{
        "dtype": ENGINE_ARGS["dtype"], "max_model_len": ENGINE_ARGS["max_model_len"],
        "max_num_seqs": ENGINE_ARGS["max_num_seqs"]}))
    blocks, block_size, tokens, max_len, concurrency = logged.groups()
    assert (plan["num_kv_blocks"], plan["block_size"], plan["kv_tokens"], plan["max_model_len"]) == (
        int(blocks), int(block_size), int(tokens), int(max_len))
    assert f"{plan['max_concurrency_at_max_model_len']:.2f}" == concurrency


def test_state_needs_the_key_and_follows_the_requests(server: Server) -> None:
    assert httpx2.get(f"{server.url}/dashboard/state").status_code == 401
    wrong = httpx2.get(f"{server.url}/dashboard/state", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["message"].startswith("Unauthorized")
    idle = state(server)
    kv = idle["kv_cache"]
    assert kv["used"] == 0 and kv["free"] + kv["cached_free"] == kv["num_blocks"] == len(kv["cells"])

    runner = run_requests(server, ["def add(a, b):"] * 2, max_tokens=400)
    seen = []
    while runner.is_alive():  # long enough to be seen running on any machine
        seen.append(state(server))
        time.sleep(0.05)
    busy = [s for s in seen if s["num_running"] == 2]
    assert busy and all(s["kv_cache"]["used"] > 0 for s in busy)
    assert all(s["kv_cache"]["cells"].count("u") == s["kv_cache"]["used"] for s in seen)
    rows = busy[-1]["running"]
    assert [r["max_tokens"] for r in rows] == [400, 400] and all(r["blocks"] > 0 for r in rows)
    assert all(r["computed_tokens"] >= r["prompt_tokens"] > 0 for r in rows)
    assert any(s["generation_tokens_per_s"] > 0 for s in busy)
    runner.join()
    done = state(server)
    assert done["kv_cache"]["used"] == 0 and done["num_running"] == done["num_waiting"] == 0
    # The same prompt twice: the second found the first's full blocks (if it had one).
    assert done["prefix_cache_queries"] > idle["prefix_cache_queries"]
    assert done["generation_tokens_total"] == idle["generation_tokens_total"] + 800
    assert done["num_preemptions"] == 0


def test_the_page_draws_the_block_grid_live_in_chromium(server: Server, tmp_path: Path) -> None:
    if not Path(CHROMIUM).is_file() or not _has_playwright():
        pytest.skip(f"needs Debian's chromium at {CHROMIUM} and playwright (make setup installs both)")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1200, "height": 900},
        )
        try:
            page = context.new_page()
            page.goto(f"{server.url}/dashboard#key={API_KEY}")
            wait_until(page, "Number(document.body.dataset.updates) >= 1")
            assert page.title() == "pagedserve dashboard"
            assert grid_cells(page, "used") == 0

            prompts = [f"# request {i}\nimport os\n" * (i + 1) for i in range(8)]
            runner = run_requests(server, prompts, max_tokens=300)  # seconds, on any machine
            wait_until(page, f"({CANVAS_COUNT})('used') > 0")
            # One frame: the cells drawn in use are the blocks the legend counts in use, and the
            # running requests' progress bars are drawn (the page's CSP allows no inline style
            # attribute). Read while the requests run: once they finish the list is empty.
            drawn, counted, widths = page.evaluate(
                f"[({CANVAS_COUNT})('used'), document.getElementById('used-blocks').textContent,"
                " [...document.querySelectorAll('#running .bar span')].map(s => s.offsetWidth)]")
            assert drawn == int(counted) > 0
            assert widths and max(widths) > 0
            page.screenshot(path=str(ARTIFACTS / "dashboard-running.png"), full_page=True)
            runner.join()
            wait_until(page, f"({CANVAS_COUNT})('used') === 0")
            assert page.text_content("#used-blocks") == "0" and page.text_content("#running-count") == "0"
            assert grid_cells(page, "cached") + grid_cells(page, "free") == int(
                page.evaluate("window.pagedserveDashboard.state.kv_cache.num_blocks"))
            page.screenshot(path=str(ARTIFACTS / "dashboard-idle.png"), full_page=True)
        finally:
            context.close()
    assert (ARTIFACTS / "dashboard-running.png").stat().st_size > 0


def wait_until(page, expression: str, timeout: float = 60.0) -> None:
    """Poll a JavaScript expression from the test (``page.wait_for_function`` evaluates strings
    in the page, which its Content-Security-Policy forbids)."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {expression[:60]}")
        time.sleep(0.1)


def _has_playwright() -> bool:
    try:
        import playwright  # noqa: F401
    except ImportError:
        return False
    return True


#: Counts the grid's cells of one state by the colour of each cell's pixels on the canvas.
CANVAS_COUNT = """(kind) => {
  const canvas = document.getElementById('grid');
  const colors = {used: [37, 99, 235], cached: [22, 163, 74], free: [229, 231, 235]};
  const [r, g, b] = colors[kind];
  const columns = Number(canvas.dataset.columns), size = Number(canvas.dataset.cellSize);
  const cells = window.pagedserveDashboard.state.kv_cache.cells.length;
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let count = 0;
  for (let i = 0; i < cells; i++) {
    const x = (i % columns) * size, y = Math.floor(i / columns) * size;
    const at = 4 * (y * canvas.width + x);
    if (data[at] === r && data[at + 1] === g && data[at + 2] === b) count++;
  }
  return count;
}"""


def grid_cells(page, kind: str) -> int:
    return page.evaluate(f"({CANVAS_COUNT})('{kind}')")
