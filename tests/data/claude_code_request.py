"""A realistic Claude Code-style Anthropic Messages request body (~117 KB), built in code.

Shape follows what Claude Code sends: `system` as text blocks with `cache_control`,
24 tool definitions with JSON schemas (built-ins plus MCP tools), a conversation with
`<system-reminder>` text, `tool_use` / `tool_result` pairs (file reads with line
numbers, shell output, a stack trace), a small pasted screenshot, `metadata.user_id`
and `cache_control` on the last user block. The text is written for this project
(not copied) and is full of things a guard must NOT flag: UUIDs, git SHAs, version
strings, dates, line numbers, loopback addresses, `${DB_PASSWORD}`-style references,
`os.environ[...]` lookups and the `noreply@anthropic.com` co-author trailer.

`build_request(target_bytes)` pads the final file read to reach the target size, so
the default gives a body the size of a measured Claude Code request (117 KB).
Other engineers reuse this for cache, routing and server benchmarks.
"""

from __future__ import annotations

import base64
import hashlib
import uuid
from typing import Any

import orjson

__all__ = ["DEFAULT_SIZE", "build_openai_request", "build_request", "build_request_bytes"]

DEFAULT_SIZE = 117 * 1024

_SESSION = uuid.UUID("7c1f1e8a-3b9d-4b65-9e43-2f4c8a0d9b11")
_ACCOUNT = uuid.UUID("0b6f2d7e-4c1a-4f3b-8a9e-5d2c7b1e6f40")
_USER_HASH = hashlib.sha256(b"claude-code-fixture").hexdigest()

_IDENTITY = "You are Claude Code, Anthropic's official CLI for Claude."

_SYSTEM_SECTIONS = [
    (
        "Tone and style",
        "You should be concise, direct, and to the point. When you run a non-trivial "
        "bash command, explain what the command does and why you are running it, so the "
        "user understands what you are doing. Your output is displayed on a command line "
        "interface and rendered as GitHub-flavored markdown in a monospace font. Only use "
        "emojis if the user explicitly asks for it. Keep responses short unless the user "
        "asks for detail; answer in fewer than four lines when that is enough.",
    ),
    (
        "Proactiveness",
        "You are allowed to be proactive, but only when the user asks you to do "
        "something. Strike a balance between doing the right thing when asked, including "
        "follow-up actions, and not surprising the user with actions they did not ask "
        "for. If the user asks how to approach something, answer the question first "
        "instead of jumping into edits.",
    ),
    (
        "Following conventions",
        "When making changes to files, first understand the file's code conventions. "
        "Mimic code style, use existing libraries and utilities, and follow existing "
        "patterns. Never assume that a given library is available, even if it is well "
        "known: check package.json, cargo.toml, pyproject.toml or requirements.txt first. "
        "When you create a new component, look at existing components to see how they are "
        "written; then consider framework choice, naming conventions, typing and other "
        "conventions. Always follow security best practices: never introduce code that "
        "exposes or logs secrets and keys, and never commit secrets or keys to the "
        "repository.",
    ),
    (
        "Task management",
        "You have access to the TodoWrite tool to help you manage and plan tasks. Use it "
        "very frequently so that you track your tasks and give the user visibility into "
        "your progress. Mark todos as completed as soon as you are done with a task; do "
        "not batch up several tasks before marking them as completed. Examples:\n\n"
        "<example>\nuser: Run the build and fix any type errors\nassistant: I'll add "
        "these items to the todo list: run the build, fix any type errors. Now I'm going "
        "to run the build using Bash. Looks like I found 10 type errors. I'll add 10 "
        "items to the todo list.\n</example>",
    ),
    (
        "Doing tasks",
        "The user will primarily request you perform software engineering tasks: solving "
        "bugs, adding functionality, refactoring code, explaining code. Recommended "
        "steps: use the search tools to understand the codebase and the query; implement "
        "the solution using all tools available; verify the solution with tests (never "
        "assume a test framework: check the README or search the codebase); run the lint "
        "and typecheck commands (for example npm run lint, ruff check, mypy --strict) if "
        "they were provided. NEVER commit changes unless the user explicitly asks you to.",
    ),
    (
        "Tool usage policy",
        "When doing file search, prefer the Task tool to reduce context usage. You can "
        "call multiple tools in a single response. When multiple independent pieces of "
        "information are requested, batch your tool calls together for optimal "
        "performance. When making multiple bash tool calls, send a single message with "
        "multiple tool calls to run them in parallel; for example, to run git status and "
        "git diff, send one message with two tool calls.",
    ),
    (
        "Code references",
        "When referencing specific functions or pieces of code include the pattern "
        "file_path:line_number so the user can navigate to the source, for example: "
        "Clients are marked as failed in the connectToServer function in "
        "src/services/process.ts:712.",
    ),
]

_ENV_BLOCK = (
    "Here is useful information about the environment you are running in:\n<env>\n"
    "Working directory: /home/dev/projects/payments-service\nIs directory a git repo: Yes\n"
    "Platform: linux\nOS Version: Linux 6.8.0-49-generic\nToday's date: 2025-03-14\n</env>\n"
    "You are powered by the model named Sonnet 4.5. The exact model ID is "
    "claude-sonnet-4-5-20250929.\n\ngitStatus: This is the git status at the start of the "
    "conversation.\nCurrent branch: feat/refund-retries\n\nMain branch (you will usually use "
    "this for PRs): main\n\nStatus:\nM src/payments/refunds.py\nM tests/test_refunds.py\n"
    "?? docs/adr/0007-refund-retries.md\n\nRecent commits:\n"
    "9f3c2a1b7e Retry refunds on 5xx from the PSP (#412)\n"
    "4e1d0c9a88 Bump httpx to 0.28.1 and pydantic to 2.10.4\n"
    "b7a6e5d4c3 Add structured logging for webhook handler\n"
    "1a2b3c4d5e Fix flaky test_settlement_window on leap years\n"
    "e8f7a6b5c4 Merge pull request #409 from org/chore/ruff-0.8\n"
)


def _schema(props: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": props,
        "required": required,
        "additionalProperties": False,
        "$schema": "http://json-schema.org/draft-07/schema#",
    }


def _s(description: str, **extra: Any) -> dict[str, Any]:
    return {"type": "string", "description": description, **extra}


def _paragraphs(topic: str, n: int) -> str:
    """Deterministic, varied usage notes so tool descriptions reach realistic lengths."""
    verbs = ["Use", "Prefer", "Avoid", "Remember", "Consider", "Always", "Never", "Check"]
    objects = [
        "absolute paths instead of relative paths",
        "the dedicated tool instead of a shell pipeline",
        "quoting paths that contain spaces with double quotes",
        "reading a file before editing it",
        "batching independent calls in one message",
        "the output limit of 30000 characters",
        "a timeout in milliseconds up to 600000 (10 minutes)",
        "line numbers starting at 1 as in cat -n",
        "glob patterns like **/*.ts or src/**/*.py",
        "ripgrep syntax: literal braces need escaping (interface\\{\\})",
    ]
    lines = []
    for i in range(n):
        verb = verbs[(i * 3 + len(topic)) % len(verbs)]
        obj = objects[(i * 7 + len(topic)) % len(objects)]
        lines.append(f" - {verb} {obj} when working with {topic} (note {i + 1}).")
    return "\n".join(lines)


_GIT_COMMIT_NOTES = (
    "# Committing changes with git\n\nWhen the user asks you to create a new git commit, "
    "follow these steps carefully:\n1. Run git status, git diff and git log in parallel.\n"
    "2. Analyze all staged changes and draft a commit message that focuses on the why.\n"
    "3. Create the commit with a message ending with:\n"
    "   🤖 Generated with [Claude Code](https://claude.com/claude-code)\n\n"
    "   Co-Authored-By: Claude <noreply@anthropic.com>\n"
    "4. If the commit fails due to pre-commit hook changes, retry ONCE.\n\n"
    "Important notes:\n- NEVER update the git config\n- NEVER use git commands with the -i "
    "flag (like git rebase -i or git add -i) since they require interactive input\n"
    "- Always pass the commit message via a HEREDOC, a la this example:\n<example>\n"
    "git commit -m \"$(cat <<'EOF'\n   Commit message here.\n\n   🤖 Generated with "
    "[Claude Code](https://claude.com/claude-code)\n\n   Co-Authored-By: Claude "
    '<noreply@anthropic.com>\n   EOF\n   )"\n</example>\n\n# Creating pull requests\nUse '
    "the gh command via the Bash tool for ALL GitHub-related tasks including working with "
    "issues, pull requests, checks, and releases. Return the PR URL when you're done, so "
    "the user can see it, e.g. https://github.com/org/payments-service/pull/413.\n"
)


def _tool(name: str, description: str, props: dict[str, Any], req: list[str]) -> dict[str, Any]:
    return {"name": name, "description": description, "input_schema": _schema(props, req)}


def _builtin_tools() -> list[dict[str, Any]]:
    path = _s("The absolute path to the file (must be absolute, not relative)")
    todo_item = {
        "type": "object",
        "properties": {
            "content": {"type": "string", "minLength": 1},
            "status": {"type": "string", "enum": ["pending", "in_progress", "completed"]},
            "activeForm": {"type": "string", "minLength": 1},
        },
        "required": ["content", "status", "activeForm"],
        "additionalProperties": False,
    }
    edit: dict[str, Any] = {
        "type": "object",
        "properties": {
            "old_string": _s("The text to replace"),
            "new_string": _s("The text to replace it with"),
            "replace_all": {"type": "boolean", "default": False},
        },
        "required": ["old_string", "new_string"],
        "additionalProperties": False,
    }
    return [
        _tool(
            "Task",
            "Launch a new agent to handle complex, multi-step tasks autonomously.\n\n"
            "Available agent types and the tools they have access to:\n- general-purpose: "
            "research complex questions, search for code, execute multi-step tasks (Tools: "
            "*)\n- statusline-setup: configure the status line setting (Tools: Read, Edit)\n"
            "- output-style-setup: create an output style (Tools: Read, Write, Edit, Glob, "
            "Grep)\n\nUsage notes:\n" + _paragraphs("sub-agents", 24),
            {
                "description": _s("A short (3-5 word) description of the task"),
                "prompt": _s("The task for the agent to perform"),
                "subagent_type": _s("The type of specialized agent to use for this task"),
            },
            ["description", "prompt", "subagent_type"],
        ),
        _tool(
            "Bash",
            "Executes a given bash command in a persistent shell session with optional "
            "timeout, ensuring proper handling and security measures.\n\nBefore executing "
            "the command, follow these steps:\n1. Directory Verification: if the command "
            "will create new directories or files, first use ls to verify the parent "
            "directory exists.\n2. Command Execution: always quote file paths that contain "
            'spaces with double quotes (e.g., cd "/Users/name/My Documents").\n\nUsage '
            "notes:\n" + _paragraphs("shell commands", 30) + "\n\n" + _GIT_COMMIT_NOTES,
            {
                "command": _s("The command to execute"),
                "timeout": {"type": "number", "description": "Optional timeout in ms (max 600000)"},
                "description": _s("Clear, concise description of what this command does"),
                "run_in_background": {"type": "boolean"},
            },
            ["command"],
        ),
        _tool(
            "Glob",
            "- Fast file pattern matching tool that works with any codebase size\n- Supports "
            'glob patterns like "**/*.js" or "src/**/*.ts"\n- Returns matching file paths '
            "sorted by modification time\n" + _paragraphs("file search", 10),
            {"pattern": _s("The glob pattern to match files against"), "path": _s("Directory")},
            ["pattern"],
        ),
        _tool(
            "Grep",
            "A powerful search tool built on ripgrep.\n\nUsage:\n- ALWAYS use Grep for "
            "search tasks. NEVER invoke grep or rg as a Bash command.\n- Supports full regex "
            'syntax (e.g., "log.*Error", "function\\s+\\w+")\n- Filter files with glob '
            'parameter (e.g., "*.js", "**/*.tsx")\n' + _paragraphs("content search", 14),
            {
                "pattern": _s("The regular expression pattern to search for in file contents"),
                "path": _s("File or directory to search in (rg PATH). Defaults to cwd."),
                "glob": _s('Glob pattern to filter files (e.g. "*.js", "*.{ts,tsx}")'),
                "output_mode": {
                    "type": "string",
                    "enum": ["content", "files_with_matches", "count"],
                },
                "-B": {"type": "number", "description": "Lines to show before each match"},
                "-A": {"type": "number", "description": "Lines to show after each match"},
                "-C": {"type": "number", "description": "Lines before and after each match"},
                "-n": {"type": "boolean", "description": "Show line numbers in output"},
                "-i": {"type": "boolean", "description": "Case insensitive search"},
                "type": _s("File type to search (rg --type), e.g. js, py, rust, go, java"),
                "head_limit": {"type": "number"},
                "multiline": {"type": "boolean"},
            },
            ["pattern"],
        ),
        _tool(
            "ExitPlanMode",
            "Use this tool when you are in plan mode and have finished presenting your plan "
            "and are ready to code. This will prompt the user to exit plan mode.\n"
            + _paragraphs("plans", 6),
            {"plan": _s("The plan you came up with, concise markdown")},
            ["plan"],
        ),
        _tool(
            "Read",
            "Reads a file from the local filesystem. You can access any file directly by "
            "using this tool.\n\nUsage:\n- The file_path parameter must be an absolute path\n"
            "- By default, it reads up to 2000 lines starting from the beginning of the file\n"
            "- Results are returned using cat -n format, with line numbers starting at 1\n"
            "- This tool allows Claude Code to read images (eg PNG, JPG, etc) and PDF files\n"
            + _paragraphs("file reads", 16),
            {
                "file_path": path,
                "offset": {"type": "number", "description": "The line number to start reading"},
                "limit": {"type": "number", "description": "The number of lines to read"},
            },
            ["file_path"],
        ),
        _tool(
            "Edit",
            "Performs exact string replacements in files.\n\nUsage:\n- You must use your "
            "Read tool at least once in the conversation before editing.\n- When editing "
            "text from Read tool output, preserve the exact indentation as it appears AFTER "
            "the line number prefix (spaces + line number + tab).\n" + _paragraphs("edits", 14),
            {**edit["properties"], "file_path": path},
            ["file_path", "old_string", "new_string"],
        ),
        _tool(
            "MultiEdit",
            "Make multiple edits to a single file in one operation. Prefer it over Edit "
            "when you need several edits to the same file.\n" + _paragraphs("multi-edits", 16),
            {"file_path": path, "edits": {"type": "array", "items": edit, "minItems": 1}},
            ["file_path", "edits"],
        ),
        _tool(
            "Write",
            "Writes a file to the local filesystem. This tool will overwrite the existing "
            "file if there is one at the provided path.\n" + _paragraphs("new files", 8),
            {"file_path": path, "content": _s("The content to write to the file")},
            ["file_path", "content"],
        ),
        _tool(
            "NotebookEdit",
            "Completely replaces the contents of a specific cell in a Jupyter notebook "
            "(.ipynb file) with new source.\n" + _paragraphs("notebooks", 6),
            {
                "notebook_path": _s("The absolute path to the Jupyter notebook file"),
                "cell_id": _s("The ID of the cell to edit"),
                "new_source": _s("The new source for the cell"),
                "cell_type": {"type": "string", "enum": ["code", "markdown"]},
                "edit_mode": {"type": "string", "enum": ["replace", "insert", "delete"]},
            },
            ["notebook_path", "new_source"],
        ),
        _tool(
            "WebFetch",
            "- Fetches content from a specified URL and processes it using an AI model\n- "
            "HTTP URLs will be automatically upgraded to HTTPS\n- Includes a self-cleaning "
            "15-minute cache for faster responses\n" + _paragraphs("web pages", 8),
            {
                "url": {"type": "string", "format": "uri", "description": "The URL to fetch"},
                "prompt": _s("The prompt to run on the fetched content"),
            },
            ["url", "prompt"],
        ),
        _tool(
            "TodoWrite",
            "Use this tool to create and manage a structured task list for your current "
            "coding session. This helps you track progress, organize complex tasks, and "
            "demonstrate thoroughness to the user.\n\n## When to Use This Tool\n1. Complex "
            "multi-step tasks\n2. Non-trivial and complex tasks\n3. User explicitly requests "
            "todo list\n\n## Examples\n\n<example>\nUser: I want to add a dark mode toggle to "
            "the application settings. Make sure you run the tests and build when you're "
            "done!\nAssistant: I'll help add a dark mode toggle. Let me create a todo list.\n"
            "*Creates todo list with the following items:*\n1. Creating dark mode toggle "
            "component in Settings page\n2. Adding dark mode state management (context/store)"
            "\n3. Implementing CSS-in-JS styles for dark theme\n4. Running tests and build "
            "process, addressing any failures or errors that occur\n</example>\n"
            + _paragraphs("todo lists", 40),
            {"todos": {"type": "array", "items": todo_item, "description": "The todo list"}},
            ["todos"],
        ),
        _tool(
            "WebSearch",
            "Allows Claude to search the web and use the results to inform responses.\n"
            "- Provides up-to-date information for current events and recent data\n"
            + _paragraphs("web search", 6),
            {
                "query": _s("The search query to use", minLength=2),
                "allowed_domains": {"type": "array", "items": {"type": "string"}},
                "blocked_domains": {"type": "array", "items": {"type": "string"}},
            },
            ["query"],
        ),
        _tool(
            "BashOutput",
            "Retrieves output from a running or completed background bash shell.\n"
            + _paragraphs("background shells", 5),
            {"bash_id": _s("The ID of the background shell"), "filter": _s("Optional regex")},
            ["bash_id"],
        ),
        _tool(
            "KillShell",
            "Kills a running background bash shell by its ID.\n" + _paragraphs("shells", 3),
            {"shell_id": _s("The ID of the background shell to kill")},
            ["shell_id"],
        ),
        _tool(
            "SlashCommand",
            "Execute a slash command within the main conversation.\nAvailable Commands:\n"
            "- /review-pr <number>: review a pull request (project)\n- /release-notes: draft "
            "release notes from merged PRs (user)\n" + _paragraphs("slash commands", 5),
            {
                "command": _s(
                    'The slash command to execute with its arguments, e.g. "/review-pr 123"'
                )
            },
            ["command"],
        ),
    ]


def _mcp_tools() -> list[dict[str, Any]]:
    repo = {"owner": _s("Repository owner"), "repo": _s("Repository name")}
    return [
        _tool(
            "mcp__ide__getDiagnostics",
            "Get language diagnostics from VS Code",
            {"uri": _s("Optional file URI to get diagnostics for.")},
            [],
        ),
        _tool(
            "mcp__ide__executeCode",
            "Execute python code in the Jupyter kernel for the current notebook file.\n"
            + _paragraphs("kernels", 4),
            {"code": _s("The code to be executed on the kernel.")},
            ["code"],
        ),
        _tool(
            "mcp__github__create_issue",
            "Create a new issue in a GitHub repository",
            {
                **repo,
                "title": _s("Issue title"),
                "body": _s("Issue body content"),
                "labels": {"type": "array", "items": {"type": "string"}},
                "assignees": {"type": "array", "items": {"type": "string"}},
            },
            ["owner", "repo", "title"],
        ),
        _tool(
            "mcp__github__get_file_contents",
            "Get the contents of a file or directory from a GitHub repository",
            {**repo, "path": _s("Path to the file or directory"), "branch": _s("Branch")},
            ["owner", "repo", "path"],
        ),
        _tool(
            "mcp__github__create_pull_request",
            "Create a new pull request in a GitHub repository",
            {
                **repo,
                "title": _s("PR title"),
                "body": _s("PR description"),
                "head": _s("The name of the branch where your changes are implemented"),
                "base": _s("The name of the branch you want the changes pulled into"),
                "draft": {"type": "boolean"},
            },
            ["owner", "repo", "title", "head", "base"],
        ),
        _tool(
            "mcp__context7__resolve-library-id",
            "Resolves a package/product name to a Context7-compatible library ID and "
            "returns a list of matching libraries.\n" + _paragraphs("library docs", 8),
            {"libraryName": _s("Library name to search for")},
            ["libraryName"],
        ),
        _tool(
            "mcp__context7__get-library-docs",
            "Fetches up-to-date documentation for a library. You must call "
            "resolve-library-id first to obtain the exact Context7-compatible library ID.\n"
            + _paragraphs("documentation", 6),
            {
                "context7CompatibleLibraryID": _s("Exact library ID, e.g. '/mongodb/docs'"),
                "topic": _s("Topic to focus documentation on (e.g., 'hooks', 'routing')"),
                "tokens": {"type": "number", "description": "Max tokens of docs (default 5000)"},
            },
            ["context7CompatibleLibraryID"],
        ),
        _tool(
            "mcp__postgres__query",
            "Run a read-only SQL query against the development database.\n"
            + _paragraphs("SQL queries", 4),
            {"sql": _s("The SQL query to run")},
            ["sql"],
        ),
    ]


_REFUNDS_SOURCE = '''"""Refund orchestration with bounded retries against the PSP."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from decimal import Decimal

import httpx

log = logging.getLogger(__name__)

PSP_URL = os.environ.get("PSP_URL", "http://127.0.0.1:8089")
API_KEY = os.environ["PSP_API_KEY"]
MAX_ATTEMPTS = 4  # see docs/adr/0007-refund-retries.md
BACKOFF = (0.2, 0.8, 3.2)


@dataclass(frozen=True)
class Refund:
    payment_id: str  # e.g. "pay_3f9a1c2b-77d4-4e0e-9b1a-2c5d8e7f6a01"
    amount: Decimal
    currency: str = "EUR"


class RefundError(Exception):
    """The PSP refused the refund or stayed unavailable after all attempts."""


def refund(client: httpx.Client, item: Refund) -> str:
    headers = {"Authorization": f"Bearer {API_KEY}", "Idempotency-Key": item.payment_id}
    for attempt in range(1, MAX_ATTEMPTS + 1):
        resp = client.post(f"{PSP_URL}/v2/refunds", json={"amount": str(item.amount)},
                           headers=headers, timeout=10.0)
        if resp.status_code < 500:
            break
        log.warning("refund attempt %d/%d failed: %s", attempt, MAX_ATTEMPTS, resp.status_code)
    if resp.status_code != 201:
        raise RefundError(f"refund {item.payment_id} failed with {resp.status_code}")
    return str(resp.json()["refund_id"])
'''

_COMPOSE = """services:
  db:
    image: postgres:16.4-alpine
    environment:
      POSTGRES_USER: payments
      POSTGRES_PASSWORD: ${DB_PASSWORD}
      POSTGRES_DB: payments
    ports:
      - "127.0.0.1:5432:5432"
  app:
    build: .
    environment:
      DATABASE_URL: postgresql://payments:${DB_PASSWORD}@db:5432/payments
      PSP_API_KEY: ${PSP_API_KEY}
      password: ${DB_PASSWORD}
      REDIS_URL: redis://localhost:6379/0
    ports:
      - "0.0.0.0:8000:8000"
"""

_PYTEST_OUTPUT = """============================= test session starts ==============================
platform linux -- Python 3.12.7, pytest-8.3.4, pluggy-1.5.0
rootdir: /home/dev/projects/payments-service
configfile: pyproject.toml
plugins: anyio-4.7.0, hypothesis-6.122.3, cov-6.0.0
collected 48 items

tests/test_refunds.py ......F.                                           [ 16%]
tests/test_settlement.py ........................................        [100%]

=================================== FAILURES ===================================
_________________________ test_refund_retries_on_503 __________________________

client = <httpx.Client object at 0x7f3a2c1d9e50>

    def test_refund_retries_on_503(client):
        item = Refund(payment_id="pay_3f9a1c2b-77d4-4e0e-9b1a-2c5d8e7f6a01",
                      amount=Decimal("12.50"))
>       assert refund(client, item) == "re_1Q2w3E4r5T6y7U8i"

tests/test_refunds.py:57:
_ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _
src/payments/refunds.py:44: in refund
    raise RefundError(f"refund {item.payment_id} failed with {resp.status_code}")
E   payments.refunds.RefundError: refund pay_3f9a1c2b-77d4-4e0e-9b1a-2c5d8e7f6a01 failed with 503
------------------------------ Captured log call -------------------------------
WARNING  payments.refunds:refunds.py:41 refund attempt 1/4 failed: 503
WARNING  payments.refunds:refunds.py:41 refund attempt 2/4 failed: 503
WARNING  payments.refunds:refunds.py:41 refund attempt 3/4 failed: 503
WARNING  payments.refunds:refunds.py:41 refund attempt 4/4 failed: 503
=========================== short test summary info ============================
FAILED tests/test_refunds.py::test_refund_retries_on_503 - payments.refunds.RefundError
========================= 1 failed, 47 passed in 2.31s =========================
"""

_GIT_LOG = """commit 9f3c2a1b7e6d5c4b3a29180716f5e4d3c2b1a098
Author: Dana Developer <dana@example.com>
Date:   Thu Mar 13 17:42:09 2025 +0100

    Retry refunds on 5xx from the PSP (#412)

commit 4e1d0c9a88f7e6d5c4b3a2918071625344f5e6d7
Author: dependabot[bot] <49699333+dependabot[bot]@users.noreply.github.com>
Date:   Wed Mar 12 09:03:55 2025 +0000

    Bump httpx to 0.28.1 and pydantic to 2.10.4
"""


def _numbered(source: str, start: int = 1) -> str:
    return "".join(f"{n:>6}→{line}\n" for n, line in enumerate(source.splitlines(), start))


def _filler_module(index: int) -> str:
    """A plausible source file for padding: type hints, UUIDs, SHAs, versions, numbers."""
    sha = hashlib.sha256(f"mod{index}".encode()).hexdigest()[:40]  # git-SHA-shaped
    ident = uuid.UUID(bytes=hashlib.sha256(f"u{index}".encode()).digest()[:16])
    cutoff = f"2025-03-{index % 28 + 1:02d}"
    return (
        f"# settlement_{index}.py — generated at commit {sha}\n"
        f'SETTLEMENT_ID = "{ident}"\n'
        f'SCHEMA_VERSION = "2.{index}.{index % 7}"\n'
        f"WINDOW_DAYS = {index % 30 + 1}\n\n"
        f"def settle_batch_{index}(rows: list[dict[str, object]], *,\n"
        f'                   cutoff: str = "{cutoff}") -> int:\n'
        f'    """Settle rows older than the cutoff; returns the number settled."""\n'
        f"    total = 0\n"
        f"    for row in rows:\n"
        f'        if str(row.get("created_at", "")) < cutoff and row.get("status") == "captured":\n'
        f'            total += int(row.get("amount_minor", 0))  # minor units, e.g. 1250 = 12.50\n'
        f"    return total\n\n"
    )


def _tiny_png_b64() -> str:
    """A deterministic ~1.5 KB 'screenshot' payload: only its shape matters (skipped)."""
    raw = b"\x89PNG\r\n\x1a\n" + hashlib.sha512(b"screenshot").digest() * 16
    return base64.b64encode(raw).decode()


def _tool_use(tool_id: str, name: str, inp: dict[str, Any]) -> dict[str, Any]:
    return {"type": "tool_use", "id": tool_id, "name": name, "input": inp}


def _tool_result(tool_id: str, content: Any) -> dict[str, Any]:
    return {"type": "tool_result", "tool_use_id": tool_id, "content": content}


def _reminder(text: str) -> dict[str, Any]:
    return {"type": "text", "text": f"<system-reminder>\n{text}\n</system-reminder>"}


def _messages(padding: str) -> list[dict[str, Any]]:
    src = "/home/dev/projects/payments-service"
    return [
        {
            "role": "user",
            "content": [
                _reminder(
                    "As you answer the user's questions, you can use the following context:\n"
                    "# claudeMd\nCodebase and user instructions are shown below.\n\nContents of "
                    f"{src}/CLAUDE.md (project instructions):\n\n- Run `make test` before "
                    "proposing a commit.\n- Python 3.12, ruff 0.8.4, mypy 1.13 strict.\n- Never "
                    "log card numbers or PSP credentials; use payments.redact.mask_pan()."
                ),
                {
                    "type": "text",
                    "text": "test_refund_retries_on_503 fails since I changed the retry loop. "
                    "Can you find out why and fix it? The screenshot shows the CI run.",
                },
                {
                    "type": "image",
                    "source": {
                        "type": "base64",
                        "media_type": "image/png",
                        "data": _tiny_png_b64(),
                    },
                },
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "I'll look at the retry loop and the failing test."},
                _tool_use(
                    "toolu_01HkV9q3Zb8XnP4cW2mR7tYs",
                    "Read",
                    {"file_path": f"{src}/src/payments/refunds.py"},
                ),
                _tool_use(
                    "toolu_01Jx4Ld8Ne2Qr6Tv0Wy3Za5B",
                    "Bash",
                    {
                        "command": "python -m pytest tests/test_refunds.py -x -q",
                        "description": "Run the refund tests",
                    },
                ),
            ],
        },
        {
            "role": "user",
            "content": [
                _tool_result("toolu_01HkV9q3Zb8XnP4cW2mR7tYs", _numbered(_REFUNDS_SOURCE)),
                _tool_result(
                    "toolu_01Jx4Ld8Ne2Qr6Tv0Wy3Za5B", [{"type": "text", "text": _PYTEST_OUTPUT}]
                ),
            ],
        },
        {
            "role": "assistant",
            "content": [
                {
                    "type": "text",
                    "text": "The loop breaks on any status below 500 but the mock returns 503 "
                    "four times, so MAX_ATTEMPTS is exhausted. Let me check the compose file "
                    "and the recent history of the test.",
                },
                _tool_use(
                    "toolu_01Pq7Rs2Tu5Vw8Xy1Za4Bc6D",
                    "Read",
                    {"file_path": f"{src}/docker-compose.yml"},
                ),
                _tool_use(
                    "toolu_01Ef3Gh6Ij9Kl2Mn5Op8Qr1S",
                    "Bash",
                    {
                        "command": "git log -2 -- tests/test_refunds.py",
                        "description": "Show recent commits touching the test",
                    },
                ),
                _tool_use(
                    "toolu_01Tu4Vw7Xy0Za3Bc6De9Fg2H",
                    "Read",
                    {"file_path": f"{src}/src/payments/settlement.py"},
                ),
            ],
        },
        {
            "role": "user",
            "content": [
                _tool_result("toolu_01Pq7Rs2Tu5Vw8Xy1Za4Bc6D", _numbered(_COMPOSE)),
                _tool_result("toolu_01Ef3Gh6Ij9Kl2Mn5Op8Qr1S", _GIT_LOG),
                _tool_result("toolu_01Tu4Vw7Xy0Za3Bc6De9Fg2H", _numbered(padding)),
                {
                    "type": "text",
                    "text": "Also keep the 4 attempts (0.2 s, 0.8 s, 3.2 s backoff) from ADR 0007.",
                    "cache_control": {"type": "ephemeral"},
                },
            ],
        },
    ]


def _system() -> list[dict[str, Any]]:
    body = "\n\n".join(f"# {title}\n{text}" for title, text in _SYSTEM_SECTIONS)
    return [
        {"type": "text", "text": _IDENTITY, "cache_control": {"type": "ephemeral"}},
        {
            "type": "text",
            "text": "You are an interactive CLI tool that helps users with software "
            "engineering tasks. Use the instructions below and the tools available to you "
            "to assist the user.\n\nIMPORTANT: Assist with defensive security tasks only. "
            "Refuse to create, modify, or improve code that may be used maliciously.\n\n"
            f"{body}\n\n{_ENV_BLOCK}",
            "cache_control": {"type": "ephemeral"},
        },
    ]


def _assemble(padding: str) -> dict[str, Any]:
    return {
        "model": "claude-sonnet-4-5-20250929",
        "max_tokens": 32000,
        "temperature": 1,
        "stream": True,
        "system": _system(),
        "tools": _builtin_tools() + _mcp_tools(),
        "messages": _messages(padding),
        "metadata": {"user_id": f"user_{_USER_HASH}_account_{_ACCOUNT}_session_{_SESSION}"},
    }


def build_request(target_bytes: int = DEFAULT_SIZE) -> dict[str, Any]:
    """The request as a dict; its orjson encoding is within ~1% of `target_bytes`."""
    modules: list[str] = []
    body = _assemble("")
    size = len(orjson.dumps(body))
    index = 0
    while size < target_bytes:
        modules.append(_filler_module(index))
        size += len(orjson.dumps(_numbered(modules[-1]))) - 2
        index += 1
    return _assemble("".join(modules))


def build_request_bytes(target_bytes: int = DEFAULT_SIZE) -> bytes:
    return orjson.dumps(build_request(target_bytes))


def build_openai_request(target_bytes: int = DEFAULT_SIZE) -> dict[str, Any]:
    """The same conversation in OpenAI chat-completions shape (tools as functions)."""
    anthropic = build_request(target_bytes)
    system = "\n\n".join(block["text"] for block in anthropic["system"])
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}]
    for msg in anthropic["messages"]:
        messages.extend(_to_openai(msg))
    tools = [
        {
            "type": "function",
            "function": {
                "name": t["name"].replace("-", "_"),
                "description": t["description"],
                "parameters": t["input_schema"],
            },
        }
        for t in anthropic["tools"]
    ]
    return {"model": "gpt-4.1", "messages": messages, "tools": tools, "stream": True}


def _to_openai(msg: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    for block in msg["content"]:
        kind = block["type"]
        if kind == "text":
            parts.append({"type": "text", "text": block["text"]})
        elif kind == "image":
            url = f"data:{block['source']['media_type']};base64,{block['source']['data']}"
            parts.append({"type": "image_url", "image_url": {"url": url}})
        elif kind == "tool_use":
            calls.append(
                {
                    "id": block["id"],
                    "type": "function",
                    "function": {
                        "name": block["name"],
                        "arguments": orjson.dumps(block["input"]).decode(),
                    },
                }
            )
        elif kind == "tool_result":
            content = block["content"]
            text = content if isinstance(content, str) else "".join(c["text"] for c in content)
            out.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": text})
    if msg["role"] == "assistant":
        text = "".join(p["text"] for p in parts)
        out.insert(0, {"role": "assistant", "content": text or None, "tool_calls": calls})
    elif parts:
        out.append({"role": "user", "content": parts})
    return out
