"""The Webhooks page in a real browser, against a real local HTTP receiver: a webhook made in the browser
(its refusals said next to their fields), its secret shown once and signing what the receiver gets, a test
delivery seen delivered in the log, a failed one retried by hand, disable and delete; a webhook edited
(only what changed is sent, a refusal said next to its field) and its secret rotated, the receiver seeing
both; an operator's and a viewer's view."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from telemetra.domain import webhooks as W
from tests.conftest import ADMIN
from tests.web.conftest import OPERATOR_KEY, PHONE, VIEWER_KEY, Browsing, eventually
from tests.webhooks.receiver import Receiver


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().up()
    yield r
    r.down()


def signed_by(secret: str, received: Any) -> bool:
    headers = {k.lower(): v for k, v in received.headers.items()}
    return W.verify(secret, int(headers["x-telemetra-timestamp"]), received.body, headers["x-telemetra-signature"])


def of_delivery(receiver: Receiver, delivery_id: str) -> list[Any]:
    return [r for r in receiver.received if r.headers.get("X-Telemetra-Delivery") == delivery_id]


def send_test(page: Any, row: Any) -> str:
    """Press the row's Send test; the id of the delivery it queued, from what the page says."""
    said = page.get_by_role("status").filter(has_text=re.compile(r"Test delivery #\d+"))
    before = said.all_inner_texts()  # an earlier test's word, which this one replaces
    row.get_by_role("button", name="Send test").click()
    expect(said).to_be_visible()
    if before:
        expect(said).not_to_have_text(before[0])
    found = re.search(r"#(\d+)", said.inner_text())
    assert found
    return found.group(1)


def test_a_webhook_made_in_the_browser_signs_a_test_that_the_receiver_gets_and_the_log_shows_delivered(
    browsing: Browsing, receiver: Receiver, artifacts: Path
) -> None:
    server = browsing.server
    browsing.watch.allow(r"status of 422")  # the two refusals below, on purpose
    page = browsing.signed_in()
    page.get_by_role("link", name="Webhooks", exact=True).click()
    page.locator('main[data-page="webhooks"][data-ready]').wait_for()
    expect(page.locator("#webhook-events-help")).to_contain_text("rollout.device.")  # the known names, as help
    name = f"ops-{secrets.token_hex(4)}"

    # Refusals are said next to the field the answer names, and only there.
    url_note, events_note = page.locator("#webhook-url-error"), page.locator("#webhook-events-error")
    page.get_by_label("URL").fill("ftp://example.com/hook")
    page.get_by_label("Name (optional)").fill(name)
    page.get_by_role("button", name="Create webhook").click()
    expect(url_note).to_contain_text("http:// or https:// URL")
    expect(page.get_by_label("URL")).to_have_attribute("aria-invalid", "true")
    expect(events_note).to_be_hidden()
    page.get_by_label("URL").fill(receiver.url)
    page.get_by_label("Events", exact=True).fill("alert.*, device.ofline")
    page.get_by_role("button", name="Create webhook").click()
    expect(events_note).to_contain_text("'device.ofline' matches no event")
    expect(url_note).to_be_hidden()
    expect(page.get_by_label("URL")).not_to_have_attribute("aria-invalid", "true")
    assert name not in server.http.get("/api/v1/webhooks", headers=ADMIN).text  # neither was stored

    page.get_by_label("Events", exact=True).fill("alert.*, device.offline")
    page.get_by_role("button", name="Create webhook").click()
    box = page.locator("[data-webhook-secret]")
    expect(box).to_contain_text("Shown once")
    expect(box.get_by_role("button", name="Copy")).to_be_visible()
    secret = box.locator("[data-secret]").inner_text().strip()
    assert secret.startswith("whsec_")
    expect(events_note).to_be_hidden()
    row = page.locator("#webhooks tr", has_text=name)
    expect(row).to_contain_text(receiver.url)
    expect(row).to_contain_text("alert.*, device.offline")
    expect(row.locator("[data-enabled]")).to_have_text("enabled")
    expect(row.locator('[data-count="delivered"]')).to_have_text("0 delivered")
    page.screenshot(path=artifacts / "webhooks-created-light-desktop.png", full_page=True)

    # Shown once: gone when the page is drawn again, and nowhere in what the API lists.
    page.reload()
    page.locator('main[data-page="webhooks"][data-ready]').wait_for()
    expect(row).to_be_visible()
    expect(page.locator("[data-secret]")).to_have_count(0)
    assert secret not in page.content()
    assert secret not in server.http.get("/api/v1/webhooks", headers=ADMIN).text

    # A test is seen delivered in the log, and the receiver has it, signed with the secret shown.
    first = send_test(page, row)
    delivered = page.locator(f'#deliveries tr[data-delivery="{first}"]')
    expect(delivered).to_have_attribute("data-status", "delivered")
    expect(delivered).to_contain_text("webhook.test")
    expect(delivered.locator("[data-response]")).to_contain_text("200")
    expect(delivered.locator("[data-attempts]")).to_have_text("1")
    [got] = eventually(lambda: of_delivery(receiver, first), what="the test delivery at the receiver")
    assert got.headers["X-Telemetra-Event"] == "webhook.test" and got.json["type"] == "webhook.test"
    assert signed_by(secret, got)
    expect(row.locator('[data-count="delivered"]')).to_have_text("1 delivered")

    # A receiver failing every attempt: the delivery ends failed, and Retry delivers it.
    receiver.fail_next(2, status=503)
    second = send_test(page, row)
    failed = page.locator(f'#deliveries tr[data-delivery="{second}"]')
    expect(failed).to_have_attribute("data-status", "failed")
    expect(failed.locator("[data-response]")).to_contain_text("503")
    expect(failed.locator("[data-attempts]")).to_have_text("2")
    expect(row.locator('[data-count="failed"]')).to_have_text("1 failed")
    page.get_by_label("Show").select_option("failed")
    expect(page.locator("#deliveries tr[data-delivery]")).to_have_count(1)  # the filter: only the failed one
    page.screenshot(path=artifacts / "webhooks-log-light-desktop.png", full_page=True)
    page.get_by_label("Show").select_option("")
    failed.get_by_role("button", name="Retry").click()
    expect(failed).to_have_attribute("data-status", "delivered")
    expect(failed.get_by_role("button", name="Retry")).to_have_count(0)
    assert [r.answered for r in of_delivery(receiver, second)] == [503, 503, 200]
    assert signed_by(secret, of_delivery(receiver, second)[-1])
    expect(row.locator('[data-count="delivered"]')).to_have_text("2 delivered")
    expect(row.locator('[data-count="failed"]')).to_have_text("0 failed")
    page.screenshot(path=artifacts / "webhooks-light-desktop.png", full_page=True)
    phone = browsing.signed_in(viewport=PHONE, color_scheme="dark")
    phone.goto(f"/#/webhooks?log={row.get_attribute('data-webhook')}")  # its log, not the first webhook's
    phone.locator('main[data-page="webhooks"][data-ready]').wait_for()
    phone.locator("#deliveries tr[data-delivery]").first.wait_for()
    phone.screenshot(path=artifacts / "webhooks-log-dark-phone.png", full_page=True)

    # Disabled: no test can be sent; then deleted, after a confirmation.
    row.get_by_role("button", name="Disable").click()
    expect(row.locator("[data-enabled]")).to_have_text("disabled")
    expect(row.get_by_role("button", name="Send test")).to_be_disabled()
    [stored] = [w for w in server.http.get("/api/v1/webhooks", headers=ADMIN).json()["webhooks"] if w["name"] == name]
    assert stored["enabled"] is False
    page.once("dialog", lambda dialog: dialog.accept())
    row.get_by_role("button", name="Delete").click()
    expect(row).to_have_count(0)
    assert name not in server.http.get("/api/v1/webhooks", headers=ADMIN).text


def test_a_webhook_edited_in_the_browser_delivers_to_its_new_url_and_a_rotated_secret_signs_the_next_delivery(
    browsing: Browsing, receiver: Receiver, artifacts: Path
) -> None:
    server = browsing.server
    browsing.watch.allow(r"status of 422")  # the refusal below, on purpose
    name = f"edit-{secrets.token_hex(4)}"
    r = server.http.post(
        "/api/v1/webhooks", json={"url": receiver.url, "name": name, "events": ["alert.*"]}, headers=ADMIN
    )
    assert r.status_code == 201, r.text
    hook_id, old_secret = r.json()["id"], r.json()["secret"]
    moved = Receiver().up()  # the URL it is moved to
    try:
        page = browsing.signed_in()
        page.goto(f"/#/webhooks?log={hook_id}")
        page.locator('main[data-page="webhooks"][data-ready]').wait_for()
        row = page.locator(f'#webhooks tr[data-webhook="{hook_id}"]')
        row.get_by_role("button", name="Edit").click()
        form = page.locator("#webhook-edit-form")
        expect(page.locator("#webhook-edit")).to_contain_text(f"Edit webhook {name}")
        expect(form.get_by_label("URL")).to_have_value(receiver.url)  # prefilled
        expect(form.get_by_label("Name", exact=True)).to_have_value(name)
        expect(form.get_by_label("Events", exact=True)).to_have_value("alert.*")
        expect(form.get_by_label("enabled")).to_be_checked()

        # A refusal is said next to the field the answer names; nothing is stored.
        form.get_by_label("Events", exact=True).fill("alert.*, device.ofline")
        form.get_by_role("button", name="Save changes").click()
        events_note = page.locator("#webhook-edit-events-error")
        expect(events_note).to_contain_text("'device.ofline' matches no event")
        expect(form.get_by_label("Events", exact=True)).to_have_attribute("aria-invalid", "true")
        expect(page.locator("#webhook-edit-url-error")).to_be_hidden()
        page.locator("#webhook-edit").screenshot(path=artifacts / "webhooks-edit-form-light-desktop.png")
        assert server.http.get(f"/api/v1/webhooks/{hook_id}", headers=ADMIN).json()["events"] == ["alert.*"]

        # The URL and events changed: only those are sent, and the next test goes to the new URL.
        sent: list[Any] = []
        page.on("request", lambda q: sent.append(q.post_data_json) if q.method == "PATCH" else None)
        form.get_by_label("URL").fill(moved.url)
        form.get_by_label("Events", exact=True).fill("device.offline, webhook.test")
        form.get_by_role("button", name="Save changes").click()
        expect(page.get_by_role("status").filter(has_text=f"{name} saved")).to_be_visible()
        expect(form).to_have_count(0)  # closed
        assert sent == [{"url": moved.url, "events": ["device.offline", "webhook.test"]}]
        expect(row).to_contain_text(moved.url)
        expect(row).to_contain_text("device.offline, webhook.test")
        stored = server.http.get(f"/api/v1/webhooks/{hook_id}", headers=ADMIN).json()
        assert (stored["url"], stored["events"], stored["name"]) == (
            moved.url,
            ["device.offline", "webhook.test"],
            name,
        )
        first = send_test(page, row)
        [got] = eventually(lambda: of_delivery(moved, first), what="the test at the new URL")
        assert signed_by(old_secret, got)
        assert of_delivery(receiver, first) == []  # not the old URL (the new one got it: the positive control)

        # Rotate: confirmed, the new secret shown once, and the next delivery signed with it, not the old one.
        row.get_by_role("button", name="Edit").click()
        messages: list[str] = []
        page.once("dialog", lambda dialog: (messages.append(dialog.message), dialog.accept()))
        page.locator("#webhook-edit").get_by_role("button", name="Rotate secret").click()
        box = page.locator("[data-webhook-secret]")
        expect(box).to_contain_text("New signing secret")
        expect(box).to_contain_text("Shown once")
        expect(box.get_by_role("button", name="Copy")).to_be_visible()
        new_secret = box.locator("[data-secret]").inner_text().strip()
        assert new_secret.startswith("whsec_") and new_secret != old_secret
        assert messages and "Rotate the signing secret" in messages[0]
        assert new_secret not in server.http.get("/api/v1/webhooks", headers=ADMIN).text
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=artifacts / "webhooks-rotated-light-desktop.png", full_page=True)
        second = send_test(page, row)
        [got] = eventually(lambda: of_delivery(moved, second), what="the test after the rotation")
        assert signed_by(new_secret, got) and not signed_by(old_secret, got)

        phone = browsing.signed_in(viewport=PHONE, color_scheme="dark")
        phone.goto(f"/#/webhooks?log={hook_id}")
        phone.locator('main[data-page="webhooks"][data-ready]').wait_for()
        phone.locator(f'#webhooks tr[data-webhook="{hook_id}"]').get_by_role("button", name="Edit").click()
        phone.locator("#webhook-edit-form").wait_for()
        phone.locator("#webhook-edit").screenshot(path=artifacts / "webhooks-edit-form-dark-phone.png")
        phone.evaluate("window.scrollTo(0, 0)")  # the sticky header where it belongs in a full-page picture
        phone.screenshot(path=artifacts / "webhooks-edit-dark-phone.png", full_page=True)
    finally:
        moved.down()
        server.http.delete(f"/api/v1/webhooks/{hook_id}", headers=ADMIN)


def test_an_operator_sends_tests_but_cannot_change_webhooks_and_a_viewer_is_told_the_page_is_not_theirs(
    browsing: Browsing, receiver: Receiver
) -> None:
    server = browsing.server
    name = f"ro-{secrets.token_hex(4)}"
    r = server.http.post(
        "/api/v1/webhooks", json={"url": receiver.url, "name": name, "events": ["webhook.test"]}, headers=ADMIN
    )
    assert r.status_code == 201, r.text
    operator = browsing.signed_in(OPERATOR_KEY)
    operator.get_by_role("link", name="Webhooks", exact=True).click()
    row = operator.locator("#webhooks tr", has_text=name)
    expect(row).to_be_visible()
    expect(operator.get_by_text("needs an admin key")).to_be_visible()
    expect(operator.get_by_role("button", name="Create webhook")).to_have_count(0)
    expect(row.get_by_role("button", name=re.compile("^(Edit|Enable|Disable|Delete|Rotate secret)$"))).to_have_count(0)
    expect(operator.locator("#webhook-edit-form")).to_have_count(0)
    delivery = send_test(operator, row)  # an operator's: the server allows it
    expect(operator.locator(f'#deliveries tr[data-delivery="{delivery}"]')).to_have_attribute(
        "data-status", "delivered"
    )
    eventually(lambda: of_delivery(receiver, delivery), what="the operator's test at the receiver")

    viewer = browsing.signed_in(VIEWER_KEY)
    expect(viewer.get_by_role("link", name="Webhooks", exact=True)).to_have_count(0)
    expect(operator.get_by_role("link", name="Webhooks", exact=True)).to_have_count(1)  # the positive control
    viewer.goto("/#/webhooks")
    viewer.locator('main[data-page="webhooks"][data-ready]').wait_for()
    expect(viewer.locator("main")).to_contain_text("This page needs an admin or operator key.")
    assert viewer.locator("[data-write]").count() == 0
    assert server.http.delete(f"/api/v1/webhooks/{r.json()['id']}", headers=ADMIN).status_code == 204
