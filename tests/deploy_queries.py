"""Every PromQL expression the deploy files hold: alert and recording rules, dashboard panels
and variables; and the metric names each one reads. Shared by the deploy tests."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "loraplex.json"

# What the dashboard's variables stand for when a query runs outside Grafana.
VARIABLES = {"$__rate_interval": "30s", "$instance": ".*", "$tenant": ".*", "$adapter": ".*"}
_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
             "group_right", "offset", "bool", "inf", "nan", "le"}


def rule_expressions() -> dict[str, str]:
    """Rule name -> expression, for every alert and recording rule."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule.get("alert") or rule["record"]: rule["expr"]
            for group in groups for rule in group["rules"]}


def dashboard_panels() -> list[dict]:
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]


def dashboard_expressions() -> dict[str, str]:
    """"panel title #n" -> expression, for every panel target."""
    return {f"{p['title']} #{i}": t["expr"] for p in dashboard_panels()
            for i, t in enumerate(p["targets"])}


def variable_selectors() -> dict[str, tuple[str, str]]:
    """Dashboard variable -> (label, series selector) of its `label_values(selector, label)`."""
    out = {}
    for var in json.loads(DASHBOARD.read_text())["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["query"])
            assert m, f"variable {var['name']}: unexpected query {var['query']!r}"
            out[var["name"]] = (m.group(2), m.group(1))
    return out


def substitute(expr: str) -> str:
    for name, value in sorted(VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name, value)
    return expr


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (a rough PromQL tokenizer: label matchers,
    ranges, grouping clauses and function names are skipped)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # ranges
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\boffset\s+\w+", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.:])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", s):
        if not m.group(2) and m.group(1) not in _KEYWORDS:
            names.add(m.group(1))
    return names
