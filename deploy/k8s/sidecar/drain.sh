#!/usr/bin/env bash
# Envoy's preStop hook in the sidecar layout: drain, then let the kubelet send SIGTERM.
#
# Envoy exits at once on SIGTERM, cutting open streams. So before that: tell it to drain
# its listeners (connections get GOAWAY / "Connection: close"; the pod has already left
# the Service endpoints, so no new clients arrive), then wait until no request is open on
# the gateway listener, at most MAX_DRAIN_SECONDS. The ext_proc server is a native sidecar
# and is stopped only after Envoy has exited, so every open stream keeps its policies.
# Uses bash's /dev/tcp, so the Envoy image needs no curl.
set -u
ADMIN_PORT="${ENVOY_ADMIN_PORT:-9901}"
MIN_DRAIN_SECONDS="${MIN_DRAIN_SECONDS:-5}"
MAX_DRAIN_SECONDS="${MAX_DRAIN_SECONDS:-600}"

admin() {  # METHOD PATH: print the admin endpoint's response body
  exec 3<>"/dev/tcp/127.0.0.1/${ADMIN_PORT}" || return 1
  # HTTP/1.1: Envoy answers HTTP/1.0 with 426.
  printf '%s %s HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n' \
    "$1" "$2" >&3
  sed '1,/^\r$/d' <&3
  exec 3<&-
}

open_requests() {
  admin GET '/stats?filter=http.gateway.downstream_rq_active' \
    | awk -F': ' '$1 == "http.gateway.downstream_rq_active" {print $2}'
}

admin POST '/drain_listeners?graceful' >/dev/null
sleep "${MIN_DRAIN_SECONDS}"
deadline=$((SECONDS + MAX_DRAIN_SECONDS))
while ((SECONDS < deadline)); do
  active="$(open_requests)"
  [[ -z "${active}" || "${active}" == 0 ]] && break
  sleep 1
done
