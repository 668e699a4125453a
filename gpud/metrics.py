"""Prometheus text exposition of the components' metric families (pure: families in, text out)."""

from __future__ import annotations

from collections.abc import Iterable

from gpud.component import Metric


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _family(metric: Metric) -> list[str]:
    lines = [f"# HELP {metric.name} {metric.help}", f"# TYPE {metric.name} {metric.kind}"]
    for labels, value in metric.samples:
        rendered = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
        name = f"{metric.name}{{{rendered}}}" if rendered else metric.name
        lines.append(f"{name} {value:g}")
    return lines


def render(version: str, families: Iterable[Metric]) -> str:
    lines = [f"# gpud {version}"]
    for metric in families:
        lines += _family(metric)
    return "\n".join(lines) + "\n"
