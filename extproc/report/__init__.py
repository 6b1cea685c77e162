"""`extproc report`: spend, savings, top spenders, guardrail hits and rejections from the
audit store (a JSON-lines file or the PostgreSQL table), as a terminal table or an
offline HTML page."""
