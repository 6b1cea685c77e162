"""Cloud credentials the gateway holds for its upstreams, and the cloud request shapes.

The gateway, not the developer, holds the cloud identity: an IAM role for Bedrock and
Claude Platform on AWS (SigV4), a Google service account or workload identity for Vertex
(OAuth bearer tokens), an api-key or Entra token for Microsoft Foundry.

- `refresh`: a credential snapshot refreshed off the event loop before it expires; the hot
  path only reads the snapshot.
- `aws`: the standard AWS credential chain (botocore) and the SigV4 signer.
- `google`: OAuth access tokens from google-auth.
- `upstreams`: pure request transforms per cloud (path, body, headers), no I/O.
"""
