"""Microsoft Entra ID access tokens for Microsoft Foundry (OAuth client credentials).

Two ways to prove the gateway's identity, both documented by Entra's v2.0 token endpoint:

- AKS workload identity (`federated_token_file`, normally `AZURE_FEDERATED_TOKEN_FILE`):
  the projected Kubernetes service-account token is sent as a `client_assertion`
  (`urn:ietf:params:oauth:client-assertion-type:jwt-bearer`); it is re-read at every
  refresh because the kubelet rotates it;
- a client secret (an app registration's secret, from env / file).

The token's scope is `https://ai.azure.com/.default` (what the Anthropic SDK's Foundry
client asks `azure-identity` for). The fetch is blocking HTTP; `Refreshing` runs it in a
thread before the token expires.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlencode

import orjson
import urllib3

from extproc.cloud.refresh import Refreshing, Snapshot
from extproc.credentials import CredentialMissing

SCOPE = "https://ai.azure.com/.default"
AUTHORITY = "https://login.microsoftonline.com"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def _form(
    client_id: str, federated_token_file: Path | None, client_secret: Callable[[], str] | None
) -> dict[str, str]:
    form = {"grant_type": "client_credentials", "client_id": client_id, "scope": SCOPE}
    if federated_token_file is not None:
        try:
            assertion = federated_token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise CredentialMissing(f"cannot read {federated_token_file}: {exc.strerror}") from exc
        form |= {"client_assertion_type": ASSERTION_TYPE, "client_assertion": assertion}
    elif client_secret is not None:
        form["client_secret"] = client_secret()
    return form


def token_fetcher(
    tenant_id: str,
    client_id: str,
    *,
    federated_token_file: Path | None = None,
    client_secret: Callable[[], str] | None = None,
    authority: str = AUTHORITY,
    clock: Callable[[], float] = time.time,
) -> Callable[[], Snapshot[str]]:
    """A blocking fetch of an Entra access token (run it in a thread)."""
    http = urllib3.PoolManager(timeout=urllib3.Timeout(total=10.0))
    url = f"{authority.rstrip('/')}/{tenant_id}/oauth2/v2.0/token"

    def fetch() -> Snapshot[str]:
        body = urlencode(_form(client_id, federated_token_file, client_secret))
        headers = {"content-type": "application/x-www-form-urlencoded"}
        answer = http.request("POST", url, body=body, headers=headers)
        data = orjson.loads(answer.data) if answer.data else {}
        if answer.status != 200 or "access_token" not in data:
            # Entra's error codes (AADSTS...) name the cause, never the secret.
            raise CredentialMissing(
                f"Entra token endpoint answered {answer.status}: {data.get('error')}"
            )
        return Snapshot(str(data["access_token"]), clock() + float(data.get("expires_in", 3600)))

    return fetch


class EntraToken(Refreshing[str]):
    """The current Entra access token for Foundry, refreshed before it expires."""

    def __init__(
        self, fetch: Callable[[], Snapshot[str]], *, clock: Callable[[], float] = time.time
    ) -> None:
        super().__init__("entra", fetch, clock=clock)

    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.current()}"}
