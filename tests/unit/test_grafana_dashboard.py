"""docs/grafana/pdserve.json: valid JSON, and every metric a panel queries is one a pdserve
server exports (a renamed metric would leave a panel silently empty)."""

import json
import os
import re

from pdserve.server.metrics import ServerMetrics

DASHBOARD = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "grafana", "pdserve.json")


def test_dashboard_queries_only_exported_metrics():
    with open(DASHBOARD) as f:
        dash = json.load(f)
    m = ServerMetrics("m")
    m._make_semi_pd()
    exported = set(re.findall(r"^# TYPE (\S+)", m.render().decode(), re.M))
    exported |= {f"{n}_bucket" for n in exported} | {f"{n}_total" for n in exported}
    used = {name for p in dash["panels"] for t in p["targets"] for name in re.findall(r"pdserve:\w+", t["expr"])}
    assert used and used <= exported, used - exported
