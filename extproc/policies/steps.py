"""The policy steps in their fixed order (see `extproc.policies.step` for the hooks).

Auth (who calls, `extproc.policies.auth`) and model policy (what is served and by which
provider, `models` + `routing`) come first, in the request headers and at the top of the
request body; then these run, in this order, on every request the gateway forwards: the
guard screens the prompt, the cache answers from (or stores) a previous answer, spend
admits and settles. Adding a policy is one package with a `Policy` and one entry here.
"""

from __future__ import annotations

from extproc.policies.budget.spending import SPEND
from extproc.policies.cache.run import CACHE
from extproc.policies.guard.run import GUARD
from extproc.policies.step import Policy

STEPS: tuple[Policy, ...] = (GUARD, CACHE, SPEND)
