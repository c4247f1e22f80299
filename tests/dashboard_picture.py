"""Draw k8s/dashboards/lapi-kv-sync.png, the README's picture of the Grafana dashboard.

Two and a half simulated hours of real runs of the job (main(), once a minute, against the
stand-ins) push to the real Pushgateway, scraped every minute (tests/test_alerts.py's
machinery). The scrapes are loaded into a real Prometheus (`promtool tsdb create-blocks-from
openmetrics`), which evaluates every panel's own query from k8s/dashboards/lapi-kv-sync.json;
matplotlib draws the answers on the dashboard's grid. Grafana is not drawn: its look is only
imitated (it is not packaged for Debian).

    pip install -e '.[picture]'             # matplotlib, for this picture only
    python3 -m tests.dashboard_picture [out.png]

Needs the Pushgateway and the prometheus and promtool binaries that .ci/install-components
provides (.cache/prometheus).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from unittest import mock

import lapi_kv_sync as job
from tests import test_alerts as alerts
from tests.real import RealPushgateway, bounded, find, free_port, stop, wait_until_ready
from tests.standins import decision
from tests.test_alerts import CLOUDFLARE_REFUSED, LAPI_REFUSED, OK, Run, SimClock, healthy
from tests.test_dashboard import DASHBOARD, panels, promql, summed_at_new_successes

OUT = DASHBOARD.with_suffix(".png")
EPOCH = datetime(2026, 12, 1, 8, 0, tzinfo=UTC).timestamp()  # minute 0 of the runs
MINUTES = 150
COLORS = {"green": "#73BF69", "red": "#F2495C", "orange": "#FF9830", "blue": "#5794F2", "purple": "#B877D9"}
PALETTE = ["#73BF69", "#FADE2A", "#5794F2", "#FF9830", "#F2495C", "#B877D9", "#8AB8FF", "#FF7383"]
BACKGROUND, PANEL, TEXT, GRID = "#111217", "#181b1f", "#ccccdc", "#2c3235"


class ElapsedClock(SimClock):
    """The simulated clock from EPOCH on (the alert tests' starts at 0, where promtool's series
    do), moving as real time does within a run, so that durations are real."""

    def __init__(self, at: float) -> None:
        super().__init__(EPOCH + at)
        self.started = time.monotonic()

    def now(self) -> float:
        return self.at + time.monotonic() - self.started


def lapi() -> list[dict]:
    """What LAPI holds: a ban, a captcha, an IPv6 ban, and decisions the job leaves out."""
    throttles = [decision(f"198.51.100.{i}", type="throttle") for i in range(3)]
    ranges = [decision(f"203.0.113.{i * 16}/28", scope="Range") for i in range(2)]
    return healthy() + throttles + ranges + [decision("not-an-address")]


def scenario(state_file: Path) -> list[Run]:
    """Half an hour without a state file (every run lists), then with one: a new ban for ten
    minutes, LAPI down five minutes, Cloudflare refusing two runs that have a write to make."""
    state = (("STATE_FILE", str(state_file)),)
    stateless = replace(OK, decisions=lapi)
    steady = replace(stateless, env=state)
    new_ban = replace(steady, decisions=lambda: [*lapi(), decision("192.0.2.50")])
    lapi_down = replace(LAPI_REFUSED, env=LAPI_REFUSED.env + state)
    cloudflare_down = replace(
        CLOUDFLARE_REFUSED, decisions=lambda: [*lapi(), decision("192.0.2.51")], env=CLOUDFLARE_REFUSED.env + state
    )
    runs = [stateless] * 30 + [steady] * 30 + [new_ban] * 10 + [steady] * 20 + [lapi_down] * 5 + [steady] * 15
    runs += [cloudflare_down] * 2 + [steady] * (MINUTES - len(runs) - 2)
    return runs


def openmetrics(values: dict[str, list[str]]) -> str:
    """The scrapes as OpenMetrics with timestamps, for promtool's backfill: each family's
    series together under its TYPE line."""
    families: dict[str, list[str]] = {}
    for name, row in sorted(values.items()):
        family = name.partition("{")[0]
        samples = [f"{name} {v} {EPOCH + 60 * k:.0f}" for k, v in enumerate(row) if v not in ("_", "stale")]
        families.setdefault(family, []).extend(samples)
    lines = []
    for family, samples in families.items():
        lines += [f"# TYPE {family} gauge", *samples]
    return "\n".join(lines) + "\n# EOF\n"


class Prometheus:
    """A real Prometheus serving the backfilled blocks on 127.0.0.1, scraping nothing."""

    def __init__(self, data: Path) -> None:
        self.data = data
        self.url = f"http://127.0.0.1:{free_port()}"

    def __enter__(self) -> Prometheus:
        config = self.data.parent / "prometheus.yml"
        config.write_text("global:\n  scrape_interval: 1m\n")
        command = [find("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={self.data}"]
        command += [f"--web.listen-address={self.url.removeprefix('http://')}", "--storage.tsdb.retention.time=100y"]
        self.process = subprocess.Popen(bounded(command), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until_ready(self.url + "/-/ready", self.process)
        return self

    def __exit__(self, *exc: object) -> None:
        stop(self.process)

    def query(self, path: str, **params: str) -> list[dict]:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=60) as answer:
            body = json.load(answer)
        assert body["status"] == "success", body
        return body["data"]["result"]


def legend(template: str, labels: dict[str, str]) -> str:
    for key, value in labels.items():
        template = template.replace("{{" + key + "}}", value)
    return template


def answers(prometheus: Prometheus, panel: dict, end: float) -> list[tuple[str, list[float], list[float]]]:
    """(legend, times, values) for every series of every target of `panel`."""
    drawn = []
    step = 300 if panel.get("interval") == "5m" else 60
    for target in panel["targets"]:
        expr = promql(target["expr"], MINUTES)
        if target.get("instant"):
            result = prometheus.query("query", query=expr, time=f"{end:.0f}")
            series = [(r["metric"], [r["value"]]) for r in result]
        else:
            result = prometheus.query("query_range", query=expr, start=f"{EPOCH:.0f}", end=f"{end:.0f}", step=str(step))
            series = [(r["metric"], r["values"]) for r in result]
        for labels, points in series:
            drawn.append(
                (legend(target["legendFormat"], labels), [float(t) for t, _ in points], [float(v) for _, v in points])
            )
    return drawn


def threshold_color(panel: dict, value: float) -> str:
    color = "blue"
    for step in panel["fieldConfig"]["defaults"].get("thresholds", {}).get("steps", []):
        if step["value"] is None or value >= step["value"]:
            color = step["color"]
    return COLORS.get(color, color)


def stat_text(panel: dict, value: float) -> tuple[str, str | None]:
    """The value as the stat panel shows it, and a mapped colour if a value mapping applies."""
    defaults = panel["fieldConfig"]["defaults"]
    for mapping in defaults.get("mappings", []):
        shown = mapping["options"].get(f"{value:g}")
        if shown:
            return shown["text"], COLORS.get(shown["color"])
    unit = defaults.get("unit")
    if unit == "dateTimeAsIso":
        return datetime.fromtimestamp(value / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S"), None
    if unit == "s":
        return (f"{value:.0f} s" if value < 120 else f"{value / 60:.1f} min"), None
    return f"{value:,.0f}", None


def draw(figure, panel: dict, drawn: list, box: tuple[float, float, float, float]) -> None:
    import matplotlib.dates as mdates

    x, y, w, h = box
    frame = figure.add_axes((x, y, w, h))
    frame.set_facecolor(PANEL)
    frame.set_xticks([])
    frame.set_yticks([])
    for spine in frame.spines.values():
        spine.set_color(GRID)
    frame.text(0.015, 0.97, panel["title"], color=TEXT, fontsize=9, weight="bold", va="top", transform=frame.transAxes)
    if panel["type"] == "stat":
        (_, _, values) = drawn[0]
        text, mapped = stat_text(panel, values[-1])
        color = mapped or threshold_color(panel, values[-1])
        if panel["options"].get("colorMode") == "background":
            frame.set_facecolor(color)
            color = "white"
        frame.text(0.5, 0.42, text, color=color if color != TEXT else TEXT, fontsize=17, ha="center", va="center")
        return
    inner = figure.add_axes((x + w * 0.08, y + h * 0.2, w * 0.88, h * 0.62))
    inner.set_facecolor(PANEL)
    inner.tick_params(colors=TEXT, labelsize=7)
    for spine in inner.spines.values():
        spine.set_visible(False)
    if panel["type"] == "bargauge":
        drawn = sorted(drawn)  # Prometheus answers in no set order
        names = [name for name, _, _ in drawn]
        values = [v[-1] for _, _, v in drawn]
        inner.barh(names, values, color=COLORS["blue"], height=0.6)
        inner.invert_yaxis()
        for i, value in enumerate(values):
            inner.text(value, i, f" {value:,.0f}", color=TEXT, va="center", fontsize=8)
        inner.set_xticks([])
        inner.set_position((x + w * 0.2, y + h * 0.06, w * 0.72, h * 0.78))
        return
    inner.grid(color=GRID, linewidth=0.5)
    log = panel["fieldConfig"]["defaults"].get("custom", {}).get("scaleDistribution", {}).get("type") == "log"
    for i, (name, times, values) in enumerate(drawn):
        when = [datetime.fromtimestamp(t, UTC) for t in times]
        limit = name.startswith("free plan")
        shown = [v if not (log and v <= 0) else float("nan") for v in values]
        inner.plot(
            when,
            shown,
            drawstyle="steps-post",
            color=COLORS["red"] if limit else PALETTE[i % len(PALETTE)],
            linestyle="--" if limit else "-",
            linewidth=1.2,
            label=name,
        )
    if log:
        inner.set_yscale("log")
    inner.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M", tz=UTC))
    inner.legend(loc="upper left", bbox_to_anchor=(0, -0.12), ncol=3, fontsize=7, frameon=False, labelcolor=TEXT)


def main(argv: list[str]) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(argv[0]) if argv else OUT
    promtool = find("promtool")
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        # timeline() gives each run a SimClock: here, this one.
        with RealPushgateway() as pushgateway, mock.patch.object(alerts, "SimClock", ElapsedClock):
            values = alerts.timeline(scenario(work / "record.gz"), pushgateway)
        (work / "scrapes.om").write_text(openmetrics(values))
        subprocess.run(
            [promtool, "tsdb", "create-blocks-from", "openmetrics", str(work / "scrapes.om"), str(work / "data")],
            check=True,
            capture_output=True,
        )
        end = EPOCH + 60 * MINUTES
        with Prometheus(work / "data") as prometheus:
            drawn = {p["id"]: answers(prometheus, p, end) for p in panels()}
    # The picture shows what the runs did: the audits panel against the scrapes themselves.
    (audits,) = [p["id"] for p in panels() if p["title"] == "Audits by reason"]
    shown = {name: counts[-1] for name, _, counts in drawn[audits]}
    done = {r: summed_at_new_successes(values, "crowdsec_kv_sync_audited", reason=r) for r in job.AUDIT_REASONS}
    assert shown == done, f"Prometheus answered {shown}, the runs made {done}"
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels())
    unit = 0.3  # inches per grid row
    figure = plt.figure(figsize=(16, rows * unit + 0.5), facecolor=BACKGROUND)
    height = rows * unit + 0.5
    figure.text(0.01, 1 - 0.25 / height, "lapi-kv-sync", color=TEXT, fontsize=12, weight="bold", va="center")
    for p in panels():
        g = p["gridPos"]
        box = (
            g["x"] / 24 + 0.003,
            1 - (0.5 + (g["y"] + g["h"]) * unit) / height + 0.004,
            g["w"] / 24 - 0.006,
            g["h"] * unit / height - 0.008,
        )
        draw(figure, p, drawn[p["id"]], box)
    figure.savefig(out, dpi=72, facecolor=BACKGROUND)
    print(f"{out}: {out.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
