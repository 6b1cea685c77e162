"""AWS credentials from the standard chain, and SigV4 signing of upstream requests.

The chain is botocore's, in its documented order: environment variables, the shared
credentials and config files (profiles, `credential_process`, SSO, assume-role), web
identity (`AWS_WEB_IDENTITY_TOKEN_FILE` + `AWS_ROLE_ARN`: EKS IRSA, GitHub OIDC), the
container endpoint (ECS task role, EKS Pod Identity) and the EC2 instance metadata service.
The chain is resolved afresh at each refresh (in a worker thread, see `refresh`), so the
gateway, not botocore's lazy refresh-on-access, decides when the network is touched.

Signing is pure CPU (`sigv4.sign_with`): SigV4 over the final body, which the ext_proc
has after every mutation (mapped model, `anthropic_beta` moved into the body).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable

import botocore.session
from botocore.credentials import Credentials, ReadOnlyCredentials, create_credential_resolver

from extproc.cloud.refresh import Refreshing, Snapshot
from extproc.credentials import CredentialMissing


def _expiry_of(credentials: Credentials) -> float | None:
    """The expiry of refreshable (temporary) credentials; None for long-lived keys."""
    expiry = getattr(credentials, "_expiry_time", None)
    if isinstance(expiry, dt.datetime):
        return expiry.timestamp()
    return None


def chain_fetcher(profile: str | None = None) -> Callable[[], Snapshot[ReadOnlyCredentials]]:
    """A blocking fetch of credentials from the standard chain (run it in a thread)."""

    def fetch() -> Snapshot[ReadOnlyCredentials]:
        session = botocore.session.Session(profile=profile)
        credentials = create_credential_resolver(session).load_credentials()
        if credentials is None:
            raise CredentialMissing("no AWS credentials found in the standard chain")
        frozen = credentials.get_frozen_credentials()
        return Snapshot(frozen, _expiry_of(credentials))

    return fetch


class AwsCredentials(Refreshing[ReadOnlyCredentials]):
    """The chain's current credentials, refreshed in the background before they expire."""

    def __init__(
        self,
        fetch: Callable[[], Snapshot[ReadOnlyCredentials]] | None = None,
        *,
        profile: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__("aws", fetch or chain_fetcher(profile), clock=clock)
