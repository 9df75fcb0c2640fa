"""Write SVG screenshots of the TUI's step views (README images).

    python scripts/tui_screenshots.py CONFIG OUT_DIR [KEY=VALUE ...]

CONFIG is a run's config file (for the README: the quickstart run, opened from the runs folder with
``runs_dir=.`` so the paths shown are short). One SVG per step, at 100x30, with Textual's own export.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from loratui.pipeline.config import load_config
from loratui.pipeline.registry import STEP_ORDER
from loratui.tui.app import LoratuiApp


async def _estimate_done(app: LoratuiApp, pilot, timeout: float = 120.0) -> None:
    from loratui.tui.estimate import EstimateArea

    area = app.query_one(EstimateArea)
    deadline = asyncio.get_running_loop().time() + timeout
    while (area.running is not None or (area.good is None and area.message is None)) and (
        asyncio.get_running_loop().time() < deadline
    ):
        await pilot.pause(0.2)


async def shoot(config: str, out: Path, overrides: list[str]) -> None:
    app = LoratuiApp(load_config(config, overrides), config_path=config, overrides=overrides)
    async with app.run_test(size=(100, 30)) as pilot:
        for i, step in enumerate(STEP_ORDER, 1):
            await pilot.press(str(i))
            await pilot.pause(0.3)
            if step == "train":  # the estimate area computes in a worker: shoot its result, not "estimating"
                await _estimate_done(app, pilot)
            app.save_screenshot(f"{i}-{step}.svg", path=str(out))
            print(out / f"{i}-{step}.svg")


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    os.environ.setdefault("TEXTUAL_ANIMATIONS", "none")
    out = Path(sys.argv[2]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    asyncio.run(shoot(sys.argv[1], out, sys.argv[3:]))


if __name__ == "__main__":
    main()
