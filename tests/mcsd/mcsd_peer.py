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

--synthetic N adds N Organizations (URA 7xxxxxxx) with one FHIR R4 Endpoint each.

Resources of the types Organization, Endpoint, HealthcareService, Location; no deletes.
With --cert/--key/--client-ca it speaks TLS and takes only clients whose certificate that
CA issued (mTLS, as a directory that admits parties by their certificate).
"""

import argparse
import bisect
import datetime
import json
import ssl
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TYPES = ("Organization", "Endpoint", "HealthcareService", "Location")
LOCK = threading.Lock()
HISTORY = {t: ([], []) for t in TYPES}  # type -> (instants, versions), oldest first
CURRENT = {t: {} for t in TYPES}  # type -> id -> newest version, in order of creation
ORDER = {t: [] for t in TYPES}  # type -> ids in order of creation
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
        resource = dict(resource)
        rtype, rid = resource["resourceType"], resource["id"]
        old = CURRENT[rtype].get(rid)
        version = int(old["meta"]["versionId"]) + 1 if old else 1
        resource["meta"] = {"versionId": str(version), "lastUpdated": fmt(t)}
        if old is None:
            ORDER[rtype].append(rid)
        CURRENT[rtype][rid] = resource
        HISTORY[rtype][0].append(t)
        HISTORY[rtype][1].append(resource)


def synthetic(n):
    """n synthetic Organizations (URA 7xxxxxxx), each with one active FHIR R4 Endpoint:
    a directory of the LRZa's size for the benchmark and the crash test."""
    for i in range(n):
        put({"resourceType": "Organization", "id": "org-syn-%d" % i,
             "identifier": [{"system": "http://fhir.nl/fhir/NamingSystem/ura",
                             "value": "7%07d" % i}],
             "active": True, "name": "Synthetische zorgaanbieder %d" % i,
             "endpoint": [{"reference": "Endpoint/ep-syn-%d" % i}]})
        put({"resourceType": "Endpoint", "id": "ep-syn-%d" % i, "status": "active",
             "connectionType": {"system": "http://terminology.hl7.org/CodeSystem/"
                                          "endpoint-connection-type",
                                "code": "hl7-fhir-rest"},
             "payloadType": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                                    "endpoint-payload-type",
                                          "code": "any"}]}],
             "payloadMimeType": ["application/fhir+json; fhirVersion=4.0"],
             "managingOrganization": {"reference": "Organization/org-syn-%d" % i},
             "address": "https://fhir-%d.example.test/r4" % i})


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
            if len(parts) == 2:
                instants, versions = HISTORY[rtype]
                since = parse(q["_since"]) if "_since" in q else None
                first = bisect.bisect_left(instants, since) if since else 0
                total = len(versions) - first
                # newest first, as a FHIR history
                newest = len(versions) - 1 - offset
                chosen = [versions[i] for i in range(newest, max(first, newest - count + 1) - 1, -1)
                          if i >= first]
                kind = "history"
                page = [{"fullUrl": "%s/%s" % (rtype, r["id"]), "resource": r,
                         "request": {"method": "PUT", "url": "%s/%s" % (rtype, r["id"])}}
                        for r in chosen]
            else:
                ids = ORDER[rtype]
                total = len(ids)
                kind = "searchset"
                page = [{"fullUrl": "%s/%s" % (rtype, i), "resource": CURRENT[rtype][i],
                         "search": {"mode": "match"}} for i in ids[offset:offset + count]]
        base = "%s://%s" % (SCHEME[0], self.headers.get("Host"))
        links = [{"relation": "self", "url": base + self.path}]
        if offset + count < total:
            nq = dict(q)
            nq["_offset"] = str(offset + count)
            links.append({"relation": "next", "url": "%s%s?%s" % (
                base, url.path, urllib.parse.urlencode(nq))})
        self.answer(200, {"resourceType": "Bundle", "type": kind, "meta": {"lastUpdated": fmt(t)},
                          "total": total, "link": links, "entry": page})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--load", help="a JSON list of resources to start with")
    ap.add_argument("--cert", help="server certificate (PEM): speak TLS")
    ap.add_argument("--key", help="server key (PEM)")
    ap.add_argument("--client-ca", help="CA whose client certificates are admitted")
    ap.add_argument("--synthetic", type=int, default=0,
                    help="add N synthetic Organizations, each with one FHIR R4 Endpoint")
    args = ap.parse_args()
    if args.load:
        for r in json.load(open(args.load)):
            put(r)
    synthetic(args.synthetic)
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
