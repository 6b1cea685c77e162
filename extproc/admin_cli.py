"""Admin commands over the store: `extproc keys ...` and `extproc cache purge`.

Gateway keys (in the store, or made for the config file):

    keys create --id ID [--user/--team/--project/--tier/--models/--expires/--label]
    keys list
    keys revoke ID
    keys rotate ID [--overlap DURATION]
    keys generate --id ID      a key and its hash, for `auth.keys` in the config file
    keys hash                  the hash of a key read from stdin

A created or rotated key is printed once, on stdout; only its hash is stored.

SSO sign-in (`sso:` in the config):

    sso revoke USER     refuse USER's tokens on every replica within auth.cache_seconds
                        (and their refresh tokens: Claude Code sends them back to /login)
    sso keygen          an Ed25519 private key (PEM) for sso.signing_key

Response cache:

    cache purge [--scope SCOPE] [--key KEY]   remove entries (a scope is team=NAME,
                                              key=ID, user=NAME or shared)
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import re
import sys
import time
from dataclasses import replace
from typing import Any

import orjson

from extproc.config import Config
from extproc.gateway import open_configured_store
from extproc.policies.auth import STORE_PREFIX, KeyRecord, hash_key, new_key, revoked
from extproc.policies.cache import ResponseCache
from extproc.signin.tokens import add_revocation, generate_pem
from extproc.store import Store, StoreError

_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def add_cache_parser(commands: Any) -> None:
    cache = commands.add_parser("cache", help="manage the response cache")
    cache.add_argument("--config", help="gateway config YAML (its store: holds the cache)")
    actions = cache.add_subparsers(dest="action", required=True)
    purge = actions.add_parser("purge", help="remove cached answers")
    purge.add_argument("--scope", help="only this scope: team=NAME, key=ID, user=NAME, shared")
    purge.add_argument("--key", help="only this cache key (the audit record's cache_key)")
    purge.add_argument(
        "--all", action="store_true", help="everything (needed without --scope/--key)"
    )


def add_sso_parser(commands: Any) -> None:
    sso = commands.add_parser("sso", help="SSO sign-in: revoke a user, make a signing key")
    sso.add_argument("--config", help="gateway config YAML (its store: holds the sessions)")
    actions = sso.add_subparsers(dest="action", required=True)
    revoke = actions.add_parser("revoke", help="refuse a user's tokens everywhere within seconds")
    revoke.add_argument("user", help="the user as the token names them (sso.oidc.user_claim)")
    actions.add_parser("keygen", help="print a new Ed25519 private key (PEM) for sso.signing_key")


async def _revoke_user(store: Store, config: Config, user: str) -> str:
    if config.sso is None:
        raise AdminError("the config has no sso: section")
    keep = {"u:": config.sso.refresh_token_seconds, "s:": config.sso.access_token_seconds}
    await add_revocation(store, "u:" + user, time.time(), keep)
    bound = config.auth.cache_seconds
    return f"revoked {user}; every replica refuses their tokens within {bound:g} s"


def add_parser(commands: Any) -> None:
    keys = commands.add_parser("keys", help="manage gateway keys")
    keys.add_argument("--config", help="gateway config YAML (its store: holds the keys)")
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create a key in the store and print it once")
    create.add_argument("--id", required=True)
    for name in ("user", "team", "project", "tier"):
        create.add_argument(f"--{name}")
    create.add_argument("--models", help="comma-separated glob patterns, e.g. 'claude-sonnet-*'")
    create.add_argument("--expires", help="an ISO date/time (UTC) or a duration: 30d, 12h")
    create.add_argument("--label", action="append", default=[], help="key=value, repeatable")
    actions.add_parser("list", help="list keys in the store (never the keys themselves)")
    revoke = actions.add_parser("revoke", help="disable a key on every replica within seconds")
    revoke.add_argument("id")
    rotate = actions.add_parser("rotate", help="replace a key's secret and print the new key")
    rotate.add_argument("id")
    rotate.add_argument("--overlap", default="0s", help="keep the old key valid this long (1h)")
    generate = actions.add_parser("generate", help="a new key and its hash for the config file")
    generate.add_argument("--id", required=True)
    actions.add_parser("hash", help="print the hash of a key read from stdin")


class AdminError(Exception):
    """A command-line mistake, reported with exit status 2."""


def parse_duration(text: str) -> float:
    match = _DURATION.match(text.strip())
    if not match:
        raise AdminError(f"{text!r} is not a duration like 90s, 15m, 12h or 30d")
    return int(match.group(1)) * _UNITS[match.group(2)]


def parse_expiry(text: str | None, now: float) -> float | None:
    if text is None:
        return None
    if _DURATION.match(text.strip()):
        return now + parse_duration(text)
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise AdminError(f"--expires {text!r}: use an ISO date (2027-01-31) or 30d") from exc
    return (moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)).timestamp()


def _labels(pairs: list[str]) -> dict[str, str]:
    labels = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise AdminError(f"--label {pair!r}: use key=value")
        labels[key] = value
    return labels


async def _load(store: Store, key_id: str) -> KeyRecord:
    raw = await store.get(STORE_PREFIX + key_id)
    if raw is None:
        raise AdminError(f"no key {key_id!r} in the store")
    return KeyRecord.from_json(raw)


async def create(store: Store, args: argparse.Namespace, now: float) -> str:
    key = new_key(args.id)
    models = tuple(m.strip() for m in args.models.split(",") if m.strip()) if args.models else None
    record = KeyRecord(
        id=args.id,
        hash=hash_key(key),
        user=args.user,
        team=args.team,
        project=args.project,
        tier=args.tier,
        models=models,
        expires_at=parse_expiry(args.expires, now),
        labels=_labels(args.label),
        created_at=now,
    )
    if not await store.set(STORE_PREFIX + args.id, record.to_json(), only_if_absent=True):
        raise AdminError(f"key {args.id!r} already exists; rotate or revoke it instead")
    return key


async def rotate(store: Store, key_id: str, overlap: float, now: float) -> str:
    record = await _load(store, key_id)
    if record.disabled:
        raise AdminError(f"key {key_id!r} is revoked; create a new one")
    key = new_key(key_id)
    rotated = replace(
        record,
        hash=hash_key(key),
        previous_hash=record.hash if overlap > 0 else None,
        previous_expires_at=now + overlap if overlap > 0 else None,
    )
    await store.set(STORE_PREFIX + key_id, rotated.to_json())
    return key


async def revoke(store: Store, key_id: str) -> None:
    record = await _load(store, key_id)
    await store.set(STORE_PREFIX + key_id, revoked(record).to_json())


async def listing(store: Store) -> list[dict[str, Any]]:
    rows = []
    for name in sorted(await store.scan(STORE_PREFIX)):
        raw = await store.get(name)
        if raw is not None:
            record = orjson.loads(raw)
            record.pop("hash", None)
            record.pop("previous_hash", None)
            rows.append(record)
    return rows


async def _purge(store: Store, config: Config, args: argparse.Namespace) -> str:
    if not (args.scope or args.key or args.all):
        raise AdminError("say what to purge: --scope, --key or --all")
    removed = await ResponseCache(store, config.cache).purge(args.scope, args.key)
    return f"purged {removed} cached answer(s)"


async def _in_store(config: Config, args: argparse.Namespace) -> str:
    store = open_configured_store(config)
    now = time.time()
    try:
        if args.command == "cache":
            return await _purge(store, config, args)
        if args.command == "sso":
            return await _revoke_user(store, config, args.user)
        if args.action == "create":
            return await create(store, args, now)
        if args.action == "rotate":
            return await rotate(store, args.id, parse_duration(args.overlap), now)
        if args.action == "revoke":
            await revoke(store, args.id)
            bound = config.auth.cache_seconds
            return f"revoked {args.id}; every replica refuses it within {bound:g} s"
        rows = await listing(store)
        return "\n".join(orjson.dumps(row).decode() for row in rows) or "no keys in the store"
    finally:
        await store.close()


def run(config: Config, args: argparse.Namespace) -> int:
    try:
        if args.action == "generate":
            key = new_key(args.id)
            print(f"key:  {key}\nhash: {hash_key(key)}")
            print(f"config:\n  auth:\n    keys:\n    - id: {args.id}\n      hash: {hash_key(key)}")
            return 0
        if args.command == "sso" and args.action == "keygen":
            print(generate_pem(), end="")
            return 0
        if args.action == "hash":
            print(hash_key(sys.stdin.readline().strip()))
            return 0
        if not config.shared_store:
            raise AdminError(
                f"{args.command} live in the store, and store: memory:// lasts one process; "
                "set store: redis://... (keys can also be declared in the config: "
                "`extproc keys generate --id ID`)"
            )
        print(asyncio.run(_in_store(config, args)))
        return 0
    except (AdminError, ValueError) as exc:
        print(f"extproc {args.command}: {exc}", file=sys.stderr)
        return 2
    except StoreError as exc:
        print(f"extproc {args.command}: the store is unreachable: {exc}", file=sys.stderr)
        return 1
