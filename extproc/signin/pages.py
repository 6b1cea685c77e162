"""The verification page's HTML (browser-facing; Claude Code never fetches it).

Plain server-rendered forms, no script: a code typed by the user (or pre-filled from
`verification_uri_complete`, never auto-submitted, RFC 8628 §5.4) is confirmed with a
button press, guarded by a double-submit CSRF token.
"""

from __future__ import annotations

from html import escape

from extproc.decisions import Respond

_STYLE = (
    "body{font:16px/1.5 system-ui,sans-serif;max-width:32rem;margin:4rem auto;padding:0 1rem}"
    "input,button{font:inherit;padding:.5rem;margin:.25rem 0;width:100%}"
    ".code{font:1.6rem monospace;letter-spacing:.2em;text-align:center}"
)
_HEADERS = (
    ("content-type", "text/html; charset=utf-8"),
    ("cache-control", "no-store"),
    ("x-frame-options", "DENY"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    (
        "content-security-policy",
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'",
    ),
)


def page(status: int, title: str, body: str, extra: tuple[tuple[str, str], ...] = ()) -> Respond:
    html = (
        f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{escape(title)}</h1>{body}</body></html>"
    )
    return Respond(status, html.encode(), _HEADERS + extra, "extproc_sso")


def message(status: int, title: str, text: str) -> Respond:
    return page(status, title, f"<p>{escape(text)}</p>")


def code_form(user_code: str, csrf: str, cookie: str) -> Respond:
    code = escape(user_code)
    body = (
        "<p>Enter the code your terminal shows, and continue only if it matches.</p>"
        '<form method="post" action="/device">'
        f'<input class="code" name="user_code" value="{code}" autocomplete="off" required>'
        f'<input type="hidden" name="csrf" value="{escape(csrf)}">'
        '<button type="submit">Continue to sign-in</button>'
        f'<button type="submit" formaction="/device/deny">Deny</button></form>'
    )
    return page(200, "Sign in to Claude Code", body, (("set-cookie", cookie),))
