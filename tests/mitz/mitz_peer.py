#!/usr/bin/env python3
"""A Mitz test peer for ketenbus's whole-system tests, written apart from the product code.

It speaks what a data holder meets at Mitz, over mTLS (a client without a certificate from
the configured client CA is refused in the TLS handshake):

- POST /geslotenautorisatievraag/xacml3: the closed question, an XACML 3.0
  XACMLAuthzDecisionQuery (SAML 2.0 profile) in a SOAP 1.2 envelope. The answer is a SOAP
  envelope with an XACML Response whose Result/Decision is Permit, Deny, NotApplicable or
  Indeterminate.
- POST /abonnementen/fhir/Subscription: an R4 Subscription (reason OTV, criteria
  Consent?_query=otv&patientid=..&providerid=..&providertype=.., channel rest-hook). Answers
  201 with the stored Subscription.

Behaviour comes from a JSON state file, read on every request, so a test can change it while
the peer runs:

  {"decision": "permit" | "deny" | "not_applicable" | "indeterminate" | "error",
   "patients": {"<bsn>": "<decision>"},   # per patient, overrides "decision"
   "delay": 0.0,                          # seconds before answering ("slow")
   "subscriptions": "refuse",             # answer 503 to subscriptions
   "notify": 0}                           # raise it to send a change notification

"down" is the peer not running. When "notify" grows, the peer posts a consent change
notification (a FHIR Bundle with the Consent and the Patient by BSN) to the rest-hook of
every subscription it holds, with the subscription's channel headers, as Mitz would.

Every request is one JSON line in the --log file (the peer may log the BSN: Mitz knows it).
Standard library only.
"""

import argparse
import json
import re
import ssl
import threading
import time
import urllib.request
import uuid
import xml.etree.ElementTree as ET
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

XACML = "urn:oasis:names:tc:xacml:3.0:core:schema:wd-17"
HL7 = "urn:hl7-org:v3"
SOAP = "http://www.w3.org/2003/05/soap-envelope"
BSN_ROOT = "2.16.840.1.113883.2.4.6.3"
BSN_SYSTEM = "http://fhir.nl/fhir/NamingSystem/bsn"
DECISIONS = {
    "permit": "Permit",
    "deny": "Deny",
    "not_applicable": "NotApplicable",
    "indeterminate": "Indeterminate",
}
CRITERIA = re.compile(
    r"^Consent\?_query=otv&patientid=(\d{9})&providerid=([^&]+)&providertype=([^&]+)$"
)


class Peer:
    def __init__(self, state_path, log_path):
        self.state_path = state_path
        self.log_path = log_path
        self.lock = threading.Lock()
        self.subscriptions = []

    def state(self):
        try:
            with open(self.state_path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return {"decision": "not_applicable"}

    def log(self, record):
        with self.lock, open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def attributes(request, category_suffix):
    for attrs in request.findall(f"{{{XACML}}}Attributes"):
        if attrs.get("Category", "").endswith(category_suffix):
            return attrs
    return None


def attribute(attrs, attribute_id):
    """The (root, extension) of an II value or (code, codeSystem) of a CV value."""
    if attrs is None:
        return None
    for a in attrs.findall(f"{{{XACML}}}Attribute"):
        if a.get("AttributeId") != attribute_id:
            continue
        value = a.find(f"{{{XACML}}}AttributeValue")
        if value is None:
            return None
        ii = value.find(f"{{{HL7}}}InstanceIdentifier")
        if ii is not None:
            return (ii.get("root"), ii.get("extension"))
        cv = value.find(f"{{{HL7}}}CodedValue")
        if cv is not None:
            return (cv.get("code"), cv.get("codeSystem"))
    return None


def response_xml(decision):
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f'<s:Envelope xmlns:s="{SOAP}"><s:Body>'
        f'<Response xmlns="{XACML}"><Result><Decision>{decision}</Decision>'
        '<Status><StatusCode Value="urn:oasis:names:tc:xacml:1.0:status:ok"/></Status>'
        "</Result></Response></s:Body></s:Envelope>"
    ).encode()


def notification(subscription):
    patient = str(uuid.uuid4())
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "type": "transaction",
        "entry": [
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": {
                    "resourceType": "Consent",
                    "status": "active",
                    "category": [
                        {
                            "coding": [
                                {
                                    "system": "http://fhir.nl/otv/CodeSystem/gegevenscategorie",
                                    "code": "GGC002",
                                }
                            ]
                        }
                    ],
                    "patient": {"reference": f"urn:uuid:{patient}"},
                },
                "request": {"method": "POST", "url": "Consent"},
            },
            {
                "fullUrl": f"urn:uuid:{patient}",
                "resource": {
                    "resourceType": "Patient",
                    "identifier": [
                        {"system": BSN_SYSTEM, "value": subscription["patientid"]}
                    ],
                },
                "request": {"method": "POST", "url": "Patient"},
            },
        ],
    }


def notifier(peer):
    """Send a notification to every subscription whenever the state's "notify" grows."""
    seen = peer.state().get("notify", 0)
    while True:
        time.sleep(0.1)
        now = peer.state().get("notify", 0)
        if now == seen:
            continue
        seen = now
        with peer.lock:
            subs = list(peer.subscriptions)
        for sub in subs:
            channel = sub["resource"]["channel"]
            req = urllib.request.Request(
                channel["endpoint"],
                data=json.dumps(notification(sub)).encode(),
                method="POST",
                headers={"Content-Type": "application/fhir+json"},
            )
            for h in channel.get("header", []):
                name, _, value = h.partition(":")
                req.add_header(name.strip(), value.strip())
            try:
                with urllib.request.urlopen(req, timeout=5) as resp:
                    status = resp.status
            except urllib.error.HTTPError as e:
                status = e.code
            except OSError as e:
                status = str(e)
            peer.log({"kind": "notified", "patientid": sub["patientid"], "status": status})


def handler(peer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def reply(self, status, body, content_type):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def body(self):
            return self.rfile.read(int(self.headers.get("Content-Length", "0")))

        def do_POST(self):
            body = self.body()
            cert = self.connection.getpeercert()
            subject = dict(x[0] for x in cert.get("subject", ())) if cert else {}
            if self.path == "/geslotenautorisatievraag/xacml3":
                self.question(body, subject.get("commonName"))
            elif self.path == "/abonnementen/fhir/Subscription":
                self.subscribe(body)
            else:
                self.reply(404, b"not found", "text/plain")

        def question(self, body, client):
            if "application/soap+xml" not in self.headers.get("Content-Type", ""):
                return self.reply(415, b"expected application/soap+xml", "text/plain")
            try:
                root = ET.fromstring(body)
                request = root.find(f".//{{{XACML}}}Request")
                resource = attributes(request, ":resource")
                subject = attributes(request, ":access-subject")
                bsn = attribute(resource, "urn:oasis:names:tc:xacml:2.0:resource:resource-id")
                record = {
                    "kind": "question",
                    "client": client,
                    "bsn": bsn[1] if bsn and bsn[0] == BSN_ROOT else None,
                    "holder": attribute(resource, "urn:ihe:iti:appc:2016:author-institution:id"),
                    "holder_type": attribute(
                        resource,
                        "urn:ihe:iti:appc:2016:document-entry:healthcare-facility-type-code",
                    ),
                    "category": attribute(
                        attributes(request, ":action"),
                        "urn:ihe:iti:appc:2016:document-entry:event-code",
                    ),
                    "party": attribute(
                        subject, "urn:nl:otv:names:tc:1.0:subject:provider-institution"
                    ),
                    "purpose": attribute(
                        attributes(request, ":environment"),
                        "urn:oasis:names:tc:xspa:1.0:subject:purposeofuse",
                    ),
                }
            except (ET.ParseError, AttributeError, TypeError):
                return self.reply(400, b"not an XACML request", "text/plain")
            if record["bsn"] is None or record["party"] is None or record["holder"] is None:
                peer.log({"kind": "bad_question"})
                return self.reply(400, b"patient, party and holder are required", "text/plain")
            state = peer.state()
            decision = state.get("patients", {}).get(record["bsn"], state.get("decision"))
            record["decision"] = decision
            peer.log(record)
            time.sleep(float(state.get("delay", 0)))
            if decision not in DECISIONS:
                return self.reply(503, b"unavailable", "text/plain")
            self.reply(200, response_xml(DECISIONS[decision]), "application/soap+xml")

        def subscribe(self, body):
            if peer.state().get("subscriptions") == "refuse":
                peer.log({"kind": "refused_subscription"})
                return self.reply(503, b"unavailable", "text/plain")
            try:
                sub = json.loads(body)
                match = CRITERIA.match(sub.get("criteria", ""))
                ok = (
                    sub.get("resourceType") == "Subscription"
                    and sub.get("status") == "requested"
                    and sub.get("reason") == "OTV"
                    and match is not None
                    and sub.get("channel", {}).get("type") == "rest-hook"
                    and sub["channel"].get("endpoint")
                )
            except (ValueError, AttributeError):
                ok = False
            if not ok:
                peer.log({"kind": "bad_subscription"})
                return self.reply(422, b'{"resourceType":"OperationOutcome"}', "application/fhir+json")
            sub["id"] = str(uuid.uuid4())
            sub["status"] = "active"
            entry = {
                "resource": sub,
                "patientid": match.group(1),
                "providerid": match.group(2),
                "providertype": match.group(3),
            }
            with peer.lock:
                peer.subscriptions.append(entry)
            peer.log({"kind": "subscription", "patientid": entry["patientid"],
                      "providerid": entry["providerid"], "providertype": entry["providertype"],
                      "endpoint": sub["channel"]["endpoint"]})
            self.reply(201, json.dumps(sub).encode(), "application/fhir+json")

    return Handler


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cert", required=True, help="server certificate (PEM)")
    p.add_argument("--key", required=True, help="server key (PEM)")
    p.add_argument("--client-ca", required=True, help="CA whose client certificates are allowed")
    p.add_argument("--state", required=True)
    p.add_argument("--log", required=True)
    a = p.parse_args()
    peer = Peer(a.state, a.log)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(a.cert, a.key)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(a.client_ca)
    server = ThreadingHTTPServer(("127.0.0.1", a.port), handler(peer))
    server.daemon_threads = True
    server.socket = ctx.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    threading.Thread(target=notifier, args=(peer,), daemon=True).start()
    peer.log({"kind": "listening", "port": a.port})
    server.serve_forever()


if __name__ == "__main__":
    main()
