"""Screenshots of the live page for docs/: the demo (`--forever`) in headless Chromium, once its scripted
endings are listed and a trailing position is selected (its path traced on the diagram), and the login form.

Run: python -m bench.page_screenshots [--out docs]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from pathlib import Path

from loguru import logger

from lifecycle.app.demo import run_demo
from tests import browser

TOKEN = "screenshot-token"


async def run(out: Path) -> None:
    reason = browser.missing()
    if reason:
        raise SystemExit(f"no browser: {reason}")
    os.environ["LIFECYCLE_API_TOKEN"] = TOKEN
    os.environ.setdefault("LIFECYCLE_DEMO_PACE", "0.3")
    stop = asyncio.Event()
    announced: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    work = Path(tempfile.mkdtemp(prefix="page-shots-"))
    demo = asyncio.create_task(run_demo(work, pace=0.3, forever=True, page_port=0, stop=stop,
                                        announce=lambda url, _token: announced.set_result(url)))
    d = await asyncio.to_thread(browser.chrome, work / "chromium-profile", 1500, 2000)
    try:
        url = await asyncio.wait_for(announced, 60)

        def shoot() -> None:
            from selenium.webdriver.common.by import By
            from selenium.webdriver.support.ui import WebDriverWait

            d.get(url)
            d.save_screenshot(str(out / "page-login.png"))
            d.find_element(By.ID, "token").send_keys(TOKEN)
            d.find_element(By.ID, "login").click()
            WebDriverWait(d, 120, 0.2).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#ended tbody tr")) >= 8
                                             and d.find_elements(By.CSS_SELECTOR, "#positions tr[data-state]"))
            WebDriverWait(d, 60, 0.2).until(
                lambda d: d.find_elements(By.CSS_SELECTOR, "#positions tr[data-state='TS_ACTIVE']")
                or len(d.find_elements(By.CSS_SELECTOR, "#positions tbody tr")) >= 3)
            rows = d.find_elements(By.CSS_SELECTOR, "#positions tr[data-state='TS_ACTIVE']") or \
                d.find_elements(By.CSS_SELECTOR, "#positions tbody tr")
            WebDriverWait(d, 30, 0.5).until(lambda d: "0s" not in {c.text for c in d.find_elements(
                By.CSS_SELECTOR, "#positions td.age")})  # the marks have moved a little
            rows[0].click()
            WebDriverWait(d, 10, 0.1).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#timeline li strong"))
            d.save_screenshot(str(out / "page.png"))

        await asyncio.to_thread(shoot)
    finally:
        await asyncio.to_thread(d.quit)
        stop.set()
        await demo
    print(f"wrote {out / 'page.png'} and {out / 'page-login.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    logger.remove()
    asyncio.run(run(args.out))


if __name__ == "__main__":
    main()
