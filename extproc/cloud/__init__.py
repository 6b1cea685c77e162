"""Cloud credentials the gateway holds for its upstreams, and the cloud request shapes.

The gateway, not the developer, holds the cloud identity: an IAM role for Bedrock and
Claude Platform on AWS (SigV4), a Google service account or workload identity for Vertex
(OAuth bearer tokens), an api key or Entra token for Microsoft Foundry.

- `config`: the `providers.NAME.cloud` settings (frozen, validated at start).
- `providers`: the credential providers a cloud's settings build (`authorize(request)`,
  the shape of `extproc.upstream.credentials.CredentialProvider`).
- `refresh`: a credential snapshot refreshed in a worker thread ahead of expiry; a request
  waits only when nothing usable is held.
- `aws` (the standard AWS chain via botocore), `sigv4` (the pure signer), `google`
  (google-auth tokens), `azure` (Entra ID client credentials).
- `upstreams`: pure request transforms per cloud (path, body, headers), no I/O; the
  adapters in `extproc.upstream.clouds` apply them.
"""
