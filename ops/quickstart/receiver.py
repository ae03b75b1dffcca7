"""ketenbus quick start: a webhook receiver that checks Ketenbus-Signature (stdlib only)."""
import hashlib, hmac, os, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

KEY = os.environ["QUICKSTART_SECRET"].encode()  # the variable's bytes as they are: no hex, no base64


class Receiver(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        good = "sha256=" + hmac.new(KEY, body, hashlib.sha256).hexdigest()
        ok = hmac.compare_digest(good, self.headers.get("Ketenbus-Signature", ""))
        print("signature", "ok" if ok else "BAD", self.headers.get("Ketenbus-Kind"), self.headers.get("Idempotency-Key"), flush=True)
        self.send_response(204 if ok else 401)
        self.end_headers()


HTTPServer(("127.0.0.1", int(sys.argv[1])), Receiver).serve_forever()
