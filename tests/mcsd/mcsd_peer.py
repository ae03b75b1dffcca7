#!/usr/bin/env python3
"""An mCSD directory for ketenbus's tests, written apart from the product code from the
published interface (FHIR R4 RESTful API: search-type with paging, history-type with
_since; IHE mCSD ITI-90/ITI-91), Python standard library only.

Why not a real FHIR server: the npm package @medplum/fhir-router (with @medplum/core, its
in-memory repository) installs here, but its router has no type-level history interaction
(`GET [type]/_history`, only `[type]/[id]/_history`) and its in-memory search returns no
`Bundle.link[relation=next]`, so ITI-91 cannot be run against it.

  GET  /<Type>?_count=N[&_offset=K]         searchset, current versions, meta.lastUpdated
                                              = now, link next while more remain
  GET  /<Type>/_history?_since=T&_count=N[&_offset=K]
                                            history, every version with lastUpdated >= T
  POST /_admin/put       body: a resource   a new version (lastUpdated = now)
  POST /_admin/down      body: "1" | "0"    answer 503 to every FHIR request, or not
  GET  /_admin/requests                     the FHIR requests served, as a JSON list

Resources of the types Organization, Endpoint, HealthcareService, Location; no deletes.
With --cert/--key/--client-ca it speaks TLS and takes only clients whose certificate that
CA issued (mTLS, as a directory that admits parties by their certificate).
"""

import argparse
import datetime
import json
import ssl
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TYPES = ("Organization", "Endpoint", "HealthcareService", "Location")
LOCK = threading.Lock()
VERSIONS = []  # every version, in order: (instant, resource)
REQUESTS = []
DOWN = [False]
SCHEME = ["http"]


def now():
    return datetime.datetime.now(datetime.timezone.utc)


def fmt(t):
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (t.microsecond // 1000)


def parse(s):
    return datetime.datetime.fromisoformat(s.replace("Z", "+00:00"))


def put(resource):
    with LOCK:
        t = now()
        resource = json.loads(json.dumps(resource))
        versions = [r for _, r in VERSIONS if r["resourceType"] == resource["resourceType"]
                    and r["id"] == resource["id"]]
        resource["meta"] = {"versionId": str(len(versions) + 1), "lastUpdated": fmt(t)}
        VERSIONS.append((t, resource))


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def answer(self, status, body, ctype="application/fhir+json"):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n)
        if self.path == "/_admin/put":
            put(json.loads(body))
            return self.answer(200, {})
        if self.path == "/_admin/down":
            DOWN[0] = body.strip() == b"1"
            return self.answer(200, {})
        self.answer(405, {"resourceType": "OperationOutcome"})

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        q = dict(urllib.parse.parse_qsl(url.query))
        parts = [p for p in url.path.split("/") if p]
        if parts == ["_admin", "requests"]:
            with LOCK:
                return self.answer(200, list(REQUESTS), "application/json")
        with LOCK:
            REQUESTS.append(self.path)
        if DOWN[0]:
            return self.answer(503, {"resourceType": "OperationOutcome"})
        if not parts or parts[0] not in TYPES or len(parts) > 2 or (
                len(parts) == 2 and parts[1] != "_history"):
            return self.answer(404, {"resourceType": "OperationOutcome"})
        rtype = parts[0]
        count = int(q.get("_count", "50"))
        offset = int(q.get("_offset", "0"))
        t = now()
        with LOCK:
            mine = [(vt, r) for vt, r in VERSIONS if r["resourceType"] == rtype]
        if len(parts) == 2:
            since = parse(q["_since"]) if "_since" in q else None
            # newest first, as a FHIR history
            chosen = [r for vt, r in reversed(mine) if since is None or vt >= since]
            kind = "history"
            entries = [{"fullUrl": "%s/%s" % (rtype, r["id"]), "resource": r,
                        "request": {"method": "PUT", "url": "%s/%s" % (rtype, r["id"])}}
                       for r in chosen]
        else:
            current = {}
            for _, r in mine:
                current[r["id"]] = r
            kind = "searchset"
            entries = [{"fullUrl": "%s/%s" % (rtype, r["id"]), "resource": r,
                        "search": {"mode": "match"}} for r in current.values()]
        page = entries[offset:offset + count]
        base = "%s://%s" % (SCHEME[0], self.headers.get("Host"))
        links = [{"relation": "self", "url": base + self.path}]
        if offset + count < len(entries):
            nq = dict(q)
            nq["_offset"] = str(offset + count)
            links.append({"relation": "next", "url": "%s%s?%s" % (
                base, url.path, urllib.parse.urlencode(nq))})
        self.answer(200, {"resourceType": "Bundle", "type": kind, "meta": {"lastUpdated": fmt(t)},
                          "total": len(entries), "link": links, "entry": page})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--load", help="a JSON list of resources to start with")
    ap.add_argument("--cert", help="server certificate (PEM): speak TLS")
    ap.add_argument("--key", help="server key (PEM)")
    ap.add_argument("--client-ca", help="CA whose client certificates are admitted")
    args = ap.parse_args()
    if args.load:
        for r in json.load(open(args.load)):
            put(r)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    if args.cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(args.cert, args.key)
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(args.client_ca)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
        SCHEME[0] = "https"
    server.serve_forever()


if __name__ == "__main__":
    main()
