"""The spend step: budgets (`ledger`: config section, pure windows and plans, the ledger's
store I/O) and their place on the request path (`spending`: admit, settle, quota).

`ledger` is re-exported here; import `extproc.policies.budget.spending` for the request
step (it needs the whole config, which itself imports the budget config from here).
"""

from extproc.policies.budget.ledger import (
    Amount,
    BudgetCheck,
    BudgetConfig,
    BudgetLedger,
    BudgetLine,
    BudgetRule,
    BudgetStatus,
    Denied,
    DuplicateReservation,
    HoldPlan,
    Metric,
    Reservation,
    Scope,
    ScopeKind,
    Window,
    WindowKind,
    window_for,
)

__all__ = [
    "Amount",
    "BudgetCheck",
    "BudgetConfig",
    "BudgetLedger",
    "BudgetLine",
    "BudgetRule",
    "BudgetStatus",
    "Denied",
    "DuplicateReservation",
    "HoldPlan",
    "Metric",
    "Reservation",
    "Scope",
    "ScopeKind",
    "Window",
    "WindowKind",
    "window_for",
]
