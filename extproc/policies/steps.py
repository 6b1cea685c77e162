"""The policy steps in their fixed order (see `extproc.policies.step` for the hooks).

On every request the gateway forwards: auth finds who calls (`extproc.policies.auth`),
the model policy what is served and by which provider (`models` + `routing`), the guard
screens the prompt, the cache answers from (or stores) a previous answer, spend admits
and settles. Auth and model policy act on the request headers (`AT_HEADERS`): they open
as the headers arrive, the others once the body is parsed. Adding a policy is one
package with a `Policy` and one entry here.
"""

from __future__ import annotations

from extproc.policies.auth import AUTH
from extproc.policies.budget.spending import SPEND
from extproc.policies.cache.run import CACHE
from extproc.policies.guard.run import GUARD
from extproc.policies.models import MODELS
from extproc.policies.step import Policy

STEPS: tuple[Policy, ...] = (AUTH, MODELS, GUARD, CACHE, SPEND)
# The policies of STEPS that open at the request headers (the rest open at the body).
AT_HEADERS: tuple[Policy, ...] = (AUTH, MODELS)


def at_headers(policy: Policy) -> bool:
    """Whether `policy` opens at the request headers."""
    return any(policy is early for early in AT_HEADERS)
