"""A webhook receiver for compose's Alertmanager that prints each alert of a notification as one
line on stdout (`docker compose logs alert-sink`), so that a firing rule is seen end to end
without a paging service. `GET /` answers for the health check. Standard library only: it runs in
the plain `python` image. Replace it with a real receiver in alertmanager.yml."""

from __future__ import annotations

import json
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# Labels every line shows in its own place rather than in the key=value list.
_NAMED = ("alertname", "severity")


def alert_lines(notification: dict[str, Any]) -> list[str]:
    """One line per alert of an Alertmanager webhook body (version 4):
    `FIRING GenqQueueGrowing [warning] pool=default: <summary>`."""
    lines = []
    for alert in notification.get("alerts", []):
        labels: dict[str, str] = alert.get("labels", {})
        others = " ".join(f"{k}={v}" for k, v in sorted(labels.items()) if k not in _NAMED)
        head = f"{alert.get('status', '?').upper()} {labels.get('alertname', '?')}"
        head += f" [{labels.get('severity', '-')}]"
        if others:
            head += f" {others}"
        summary = alert.get("annotations", {}).get("summary", "")
        lines.append(f"{head}: {summary}" if summary else head)
    return lines


class Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        try:
            notification = json.loads(body)
        except ValueError:
            self.send_response(400)
            self.end_headers()
            return
        for line in alert_lines(notification):
            print(line, flush=True)
        self.send_response(200)
        self.end_headers()

    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok\n")

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the alerts are the output, not the access log."""


if __name__ == "__main__":
    host = os.environ.get("ALERT_SINK_HOST", "0.0.0.0")
    port = int(os.environ.get("ALERT_SINK_PORT", "9095"))
    server = ThreadingHTTPServer((host, port), Handler)
    print(f"alert-sink listening on {host}:{port}", flush=True)
    server.serve_forever()
