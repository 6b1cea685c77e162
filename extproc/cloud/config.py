"""Config for cloud-hosted Claude upstreams: `providers.<name>.cloud` (frozen, validated at start).

```yaml
providers:
  bedrock:
    api: bedrock
    base_url: https://bedrock-runtime.us-east-1.amazonaws.com
    cloud: {kind: bedrock, region: us-east-1, inference_profile: us}
  vertex:
    api: vertex
    base_url: https://us-east5-aiplatform.googleapis.com
    cloud: {kind: vertex, project: my-project, region: us-east5,
            models: {claude-sonnet-4-5: claude-sonnet-4-5@20250929}}
```

Credentials are never in this file: AWS ones come from the standard chain (env, shared
files / `profile`, IRSA web identity, container and instance roles), Google ones from
`key_file` or Application Default Credentials, Entra ones from a federated token file or
a client secret source, api keys from the provider's `credential`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from extproc.apis.kind import ApiKind
from extproc.cloud import upstreams
from extproc.credentials import CredentialSource

_AWS_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d{1,2}$")
_GCP_REGION = re.compile(r"^(global|[a-z]+-[a-z]+\d{1,2})$")
_GCP_PROJECT = re.compile(r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$")
_PROFILE = re.compile(r"^[A-Za-z0-9_.+@-]{1,64}$")
_WORKSPACE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_AZURE_ID = re.compile(r"^[A-Za-z0-9.-]{1,128}$")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _match(pattern: re.Pattern[str], value: str, what: str) -> str:
    if not pattern.match(value):
        raise ValueError(f"{value!r} is not {what}")
    return value


class _Aws(_Frozen):
    region: str
    # A profile in the shared config/credentials files; None: the default chain.
    profile: str | None = None

    @field_validator("region")
    @classmethod
    def _region(cls, value: str) -> str:
        return _match(_AWS_REGION, value, "an AWS region like 'us-east-1'")

    @field_validator("profile")
    @classmethod
    def _profile(cls, value: str | None) -> str | None:
        return value if value is None else _match(_PROFILE, value, "an AWS profile name")


class BedrockSettings(_Aws):
    """Amazon Bedrock (InvokeModel), signed with SigV4 for service `bedrock`."""

    kind: Literal["bedrock"]
    serves: ClassVar[ApiKind] = "bedrock"  # the provider `api:` this cloud goes with
    # Prefix bare `anthropic.` ids with this cross-region inference profile (us, eu, apac, global).
    inference_profile: str | None = None
    # Client model -> Bedrock id or inference-profile ARN (e.g. claude-sonnet-4-5 ->
    # us.anthropic.claude-sonnet-4-5-20250929-v1:0). Unmapped models must be Bedrock ids.
    models: dict[str, str] = Field(default_factory=dict)
    # The anthropic-beta flags passed on (others are dropped: Bedrock refuses unknown
    # flags with 400); ["*"] passes every flag.
    betas: tuple[str, ...] = upstreams.BEDROCK_BETAS
    # False: the provider's `credential` is a Bedrock API key (sent as a bearer token,
    # what AWS_BEARER_TOKEN_BEDROCK holds) instead of SigV4 from the AWS chain.
    sigv4: bool = True

    @property
    def allowed_betas(self) -> frozenset[str] | None:
        return None if "*" in self.betas else frozenset(self.betas)

    @field_validator("inference_profile")
    @classmethod
    def _prefix(cls, value: str | None) -> str | None:
        return value if value is None else upstreams.check_profile_prefix(value)

    @field_validator("models")
    @classmethod
    def _models(cls, value: dict[str, str]) -> dict[str, str]:
        for target in value.values():
            upstreams.bedrock_model_id(target, {}, None)
        return value


class VertexSettings(_Frozen):
    """Google Vertex AI (rawPredict), with an OAuth access token."""

    kind: Literal["vertex"]
    serves: ClassVar[ApiKind] = "vertex"
    project: str
    region: str
    # A service account JSON key; None: Application Default Credentials (workload identity,
    # the metadata server, GOOGLE_APPLICATION_CREDENTIALS).
    key_file: Path | None = None
    # Client model -> Vertex id with its version (claude-sonnet-4-5 -> claude-sonnet-4-5@20250929).
    models: dict[str, str] = Field(default_factory=dict)

    @field_validator("project")
    @classmethod
    def _project(cls, value: str) -> str:
        return _match(_GCP_PROJECT, value, "a Google Cloud project id")

    @field_validator("region")
    @classmethod
    def _region(cls, value: str) -> str:
        return _match(_GCP_REGION, value, "a Vertex region like 'us-east5' or 'global'")

    @field_validator("key_file")
    @classmethod
    def _key(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"service account key file {value} does not exist")
        return value

    @field_validator("models")
    @classmethod
    def _models(cls, value: dict[str, str]) -> dict[str, str]:
        for target in value.values():
            upstreams.vertex_model_id(target, {})
        return value


class EntraSettings(_Frozen):
    """Microsoft Entra ID client credentials: a federated token file or a client secret."""

    tenant_id: str
    client_id: str
    # AKS workload identity mounts this (AZURE_FEDERATED_TOKEN_FILE).
    federated_token_file: Path | None = None
    client_secret: CredentialSource | None = None
    authority: str = "https://login.microsoftonline.com"

    @field_validator("tenant_id", "client_id")
    @classmethod
    def _ids(cls, value: str) -> str:
        return _match(_AZURE_ID, value, "an Entra tenant or client id")


class FoundrySettings(_Frozen):
    """Microsoft Foundry: the Messages API at `{base_url}/v1/messages`.

    Without `entra`, the provider's `credential` is the Foundry api key.
    """

    kind: Literal["foundry"]
    serves: ClassVar[ApiKind] = "anthropic"
    entra: EntraSettings | None = None


class ClaudePlatformAwsSettings(_Aws):
    """Claude Platform on AWS: SigV4 (`aws-external-anthropic`) or the provider's api key."""

    kind: Literal["claude_platform_aws"]
    serves: ClassVar[ApiKind] = "anthropic"
    # Sent as anthropic-workspace-id; None: the caller's header is forwarded.
    workspace_id: str | None = None
    # True: sign with the AWS chain; False: the provider's `credential` is an api key.
    sigv4: bool = True

    @field_validator("workspace_id")
    @classmethod
    def _workspace(cls, value: str | None) -> str | None:
        return value if value is None else _match(_WORKSPACE, value, "a workspace id")


CloudSettings = Annotated[
    BedrockSettings | VertexSettings | FoundrySettings | ClaudePlatformAwsSettings,
    Field(discriminator="kind"),
]
