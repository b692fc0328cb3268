"""Constants of the agent's tests, importable by name (`from agent_kit import ...`: conftest.py is not
importable by name when several test folders run in one pytest call)."""

# No package to install: building the venv needs no network and takes a few seconds.
REQUIREMENTS = "# the tiny test model needs only the standard library\n"

TINY_APP = '''
"""A tiny model for the agent's tests: standard library only, listens on $PORT."""
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/exit":
            print("tiny model exits on request", flush=True)
            os._exit(7)
        body = json.dumps({
            "model": "tiny",
            "path": self.path,
            "prefix": sys.prefix,
            "deployment": os.environ.get("MIAAS_DEPLOYMENT_ID"),
            "named_port": os.environ.get("MIAAS_PORT_BACKEND"),
            "leaked_token": os.environ.get("AGENT_JOIN_TOKEN"),
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        print("tiny model served", self.path, flush=True)


port = int(os.environ["PORT"])
print(f"tiny model listening on {port}", flush=True)
HTTPServer(("127.0.0.1", port), Handler).serve_forever()
'''
