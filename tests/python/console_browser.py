"""Drive the ketenbus console in headless Chromium (Debian's, through Playwright) as an
operator would: log in, look at the overview, search, open a message and its raw form,
replay a dead letter and see it delivered, pause and resume a subscription, log out.
Screenshots of each page go to --shots; every URL the browser asked for goes to --urls (one
per line) so the caller can check that no patient data was ever in one.

Run by tests/tests/console.rs; exits non-zero with the reason on the first failed check.
"""

import argparse
import json
import sys
import time
import urllib.request

from playwright.sync_api import expect, sync_playwright


def post_message(base, body):
    req = urllib.request.Request(
        base + "/api/v1/messages",
        data=body.encode(),
        headers={"Content-Type": "application/EDIFACT"},
        method="POST",
    )
    with urllib.request.urlopen(req) as resp:
        return json.loads(resp.read())["id"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True, help="the console, e.g. http://127.0.0.1:8080/console/")
    ap.add_argument("--api", required=True, help="the broker's base URL, for posting a message")
    ap.add_argument("--token", required=True)
    ap.add_argument("--message", required=True, help="id of a dead-lettered message")
    ap.add_argument("--sender", required=True, help="its sender party id")
    ap.add_argument("--dead-sub", required=True, help="the subscription it was dead-lettered by")
    ap.add_argument("--pause-sub", required=True, help="a subscription to pause and resume")
    ap.add_argument("--next-message", required=True, help="EDIFACT body to post while paused")
    ap.add_argument("--patient", help="a BSN to search by")
    ap.add_argument("--fhir-sub", help="a Subscription made through /fhir/Subscription (fhir-<id>)")
    ap.add_argument("--shots", required=True)
    ap.add_argument("--urls", required=True)
    a = ap.parse_args()

    urls = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1360, "height": 900})
        page.on("request", lambda r: urls.append(r.url))
        page.on("framenavigated", lambda f: urls.append(f.url))
        page.on("dialog", lambda d: d.accept())
        expect.set_options(timeout=20_000)

        def shot(name):
            page.screenshot(path=f"{a.shots}/{name}.png", full_page=True)

        # Without a session the console sends the browser to its login page.
        page.goto(a.url)
        expect(page).to_have_url(a.url + "login")
        expect(page).to_have_title("ketenbus console: log in")
        page.fill("#token", "kb_not_a_token")
        page.click("#login-button")
        expect(page.locator("#login-error")).to_contain_text("not an operator token")
        page.fill("#token", a.token)
        shot("01-login")
        page.click("#login-button")
        expect(page).to_have_url(a.url)
        expect(page.locator("#operator")).to_have_text("alice")

        # Overview: live numbers and charts from the metrics registry.
        subs = 3 if a.fhir_sub else 2
        expect(page.locator("#overview-subs tbody tr")).to_have_count(subs)
        expect(page.locator("#cards .card .n").first).not_to_have_text("0")
        expect(page.locator("#chart-connectors svg rect")).not_to_have_count(0)
        time.sleep(7)  # a few refreshes: the sparklines get points
        expect(page.locator("#overview-subs svg path.line")).to_have_count(subs)
        shot("02-overview")

        # Search: the filters go in a POST body; the result links to the message.
        page.click("#nav-search")
        if a.patient:
            page.fill("input[name=patient]", a.patient)
        else:
            page.select_option("select[name=status]", "dead_lettered")
            page.fill("input[name=subscription]", a.dead_sub)
        page.click("#search-button")
        link = page.locator("#results a", has_text=a.message)
        expect(link).to_have_count(1)
        shot("03-search")
        link.click()

        # The message: lineage timeline, dead letter in it, raw form on request.
        expect(page.locator("#message-id")).to_have_text(a.message)
        expect(page.locator("#timeline li").first).to_contain_text("received")
        expect(page.locator("#timeline")).to_contain_text("dead lettered")
        expect(page.locator("#message-acks")).to_contain_text("acknowledge")
        page.click("#show-raw")
        expect(page.locator("#raw")).to_contain_text("UNB+UNOA:1")
        expect(page.locator("#events")).to_contain_text('"kind": "lab_result"')
        expect(page.locator("#events")).to_contain_text('"patient_key"')
        shot("04-message")
        for t in [page.title()]:
            if any(ch.isdigit() for ch in t):
                sys.exit(f"a page title carries an id or number: {t!r}")

        # Dead letters: replay the selected one and see it delivered.
        page.goto(a.url + "#dead-letters/" + a.dead_sub)
        row = page.locator("#dead-letters tbody tr", has_text=a.message)
        expect(row).to_have_count(1)
        row.locator("input.dl-pick").check()
        shot("05-dead-letters")
        page.click("#dl-replay-selected")
        expect(page.locator("#flash")).to_have_text("1 dead letter(s) replayed")
        page.goto(a.url + "#message/" + a.message)
        delivered = page.locator("#message-deliveries li", has_text=a.dead_sub)
        for _ in range(60):
            if "delivered" in delivered.first.inner_text():
                break
            time.sleep(0.5)
            page.reload()
        expect(delivered.first).to_contain_text("delivered")
        shot("06-message-after-replay")

        # Subscriptions: pause one, post a message, it is not delivered; resume, it is.
        page.click("#nav-subscriptions")
        row = page.locator(f"#subs tr[data-name='{a.pause_sub}']")
        expect(row).to_contain_text("running")
        page.click(f"#pause-{a.pause_sub}")
        expect(row).to_contain_text("paused")
        expect(page.locator("#flash")).to_have_text(f"{a.pause_sub} paused")
        shot("07-subscriptions-paused")
        held = post_message(a.api, a.next_message)
        time.sleep(3)
        page.goto(a.url + "#message/" + held)
        expect(page.locator("#timeline")).to_contain_text("received")
        time.sleep(1)
        if a.pause_sub in page.locator("#message-deliveries").inner_text():
            sys.exit("a paused subscription delivered")
        page.click("#nav-subscriptions")
        page.click(f"#resume-{a.pause_sub}")
        expect(row).to_contain_text("running")
        shot("08-subscriptions-resumed")

        # A Subscription made through /fhir/Subscription is listed, marked, and paused and
        # resumed like a configured one.
        if a.fhir_sub:
            fhir = page.locator(f"#subs tr[data-name='{a.fhir_sub}']")
            expect(fhir).to_contain_text("FHIR Subscription")
            expect(fhir).to_contain_text("running")
            shot("09-subscriptions-fhir")
            page.click(f"#pause-{a.fhir_sub}")
            expect(fhir).to_contain_text("paused")
            expect(page.locator("#flash")).to_have_text(f"{a.fhir_sub} paused")
            page.click(f"#resume-{a.fhir_sub}")
            expect(fhir).to_contain_text("running")
            page.goto(a.url + "#dead-letters/" + a.fhir_sub)
            expect(page.locator("#dl-sub")).to_have_text(a.fhir_sub)
            page.click("#nav-subscriptions")
        page.goto(a.url + "#message/" + held)
        delivered = page.locator("#message-deliveries li", has_text=a.pause_sub)
        for _ in range(60):
            if delivered.count() and "delivered" in delivered.first.inner_text():
                break
            time.sleep(0.5)
            page.reload()
        expect(delivered.first).to_contain_text("delivered")

        # Logout ends the session: the app page sends the browser back to login.
        page.click("#logout")
        expect(page).to_have_url(a.url + "login")
        page.goto(a.url)
        expect(page).to_have_url(a.url + "login")
        browser.close()

    with open(a.urls, "w") as f:
        f.write("\n".join(urls) + "\n")
    print(json.dumps({"held": held}))


if __name__ == "__main__":
    main()
