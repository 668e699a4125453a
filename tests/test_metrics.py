"""Prometheus rendering of the components' metric families."""

from __future__ import annotations

from gpud import metrics
from gpud.component import Metric, gauge


def test_families_render_with_help_type_and_samples() -> None:
    families = [
        gauge("gpud_up", "1 while the agent runs.", 1),
        Metric(
            name="gpud_members",
            help="Cluster members by Serf status.",
            samples=[({"status": "alive"}, 2), ({"status": "failed"}, 1)],
        ),
        Metric(name="gpud_ray_restarts_total", help="Restarts.", samples=[({}, 3)], kind="counter"),
    ]
    lines = metrics.render("0.2.0", families).splitlines()
    assert lines[0] == "# gpud 0.2.0"
    assert "# TYPE gpud_up gauge" in lines and "gpud_up 1" in lines
    assert 'gpud_members{status="alive"} 2' in lines
    assert 'gpud_members{status="failed"} 1' in lines
    assert "# TYPE gpud_ray_restarts_total counter" in lines
    assert "gpud_ray_restarts_total 3" in lines
    for line in lines:
        assert line.startswith("#") or line.startswith("gpud_")


def test_label_values_are_escaped() -> None:
    family = Metric(
        name="gpud_peer_reachable",
        help="h",
        samples=[({"peer": 'a"b\\c\nd', "direction": "out"}, 1.0)],
    )
    text = metrics.render("0", [family])
    assert 'gpud_peer_reachable{peer="a\\"b\\\\c\\nd",direction="out"} 1' in text.splitlines()
