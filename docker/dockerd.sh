#!/usr/bin/env bash
# Start / stop a Docker engine for fedsec's container tests and `fedsec deploy --docker`.
#
#   docker/dockerd.sh start STATE_DIR   # no-op (prints "external") if an engine already answers
#   docker/dockerd.sh stop  STATE_DIR   # only stops an engine that `start` started; restores iptables
#
# Debian's docker.io does not start its service by itself on these machines. `start` saves
# the iptables rules it finds (dockerd sets FORWARD to DROP and adds ~35 rules), starts
# dockerd in a session of its own (setsid) and waits until `docker info` answers. `stop`
# ends that dockerd by its pid, restores the saved rules and removes the docker0 bridge if
# it was not there before. Nothing here touches an engine this script did not start.
set -euo pipefail
cmd="${1:-}"; state="${2:-}"
if [[ -z "$cmd" || -z "$state" ]]; then
  echo "usage: $0 start|stop STATE_DIR" >&2; exit 2
fi
DOCKER="${DOCKER:-$(command -v /usr/bin/docker || command -v docker || true)}"

case "$cmd" in
start)
  mkdir -p "$state"
  if [[ -n "$DOCKER" ]] && timeout 10 "$DOCKER" info >/dev/null 2>&1; then
    echo external > "$state/owner"; echo "external"; exit 0
  fi
  DOCKERD="$(command -v dockerd || echo /usr/sbin/dockerd)"
  if [[ ! -x "$DOCKERD" ]]; then
    echo "dockerd not found: apt-get install docker.io" >&2; exit 3
  fi
  if command -v iptables-save >/dev/null 2>&1; then
    iptables-save > "$state/iptables.before" 2>/dev/null || true
  fi
  ip link show docker0 >/dev/null 2>&1 && touch "$state/docker0.before" || rm -f "$state/docker0.before"
  setsid "$DOCKERD" --pidfile "$state/dockerd.pid" > "$state/dockerd.log" 2>&1 < /dev/null &
  echo $! > "$state/dockerd.launcher.pid"
  echo self > "$state/owner"
  for _ in $(seq 1 120); do
    if timeout 5 "$DOCKER" info >/dev/null 2>&1; then echo "started"; exit 0; fi
    if ! kill -0 "$(cat "$state/dockerd.launcher.pid")" 2>/dev/null; then
      echo "dockerd exited while starting; its log:" >&2; tail -20 "$state/dockerd.log" >&2; exit 3
    fi
    sleep 0.5
  done
  echo "dockerd did not answer within 60 s; see $state/dockerd.log" >&2; exit 3
  ;;
stop)
  [[ -f "$state/owner" && "$(cat "$state/owner")" == self ]] || { echo "not started here: left alone"; exit 0; }
  pid="$(cat "$state/dockerd.pid" 2>/dev/null || cat "$state/dockerd.launcher.pid")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" || true
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" || true
  fi
  if [[ -f "$state/iptables.before" ]] && command -v iptables-restore >/dev/null 2>&1; then
    # Tables dockerd created that were not loaded before (e.g. nat) are emptied; the rest restored.
    for t in filter nat mangle raw; do
      if ! grep -q "^\*$t" "$state/iptables.before"; then
        iptables -t "$t" -F 2>/dev/null || true; iptables -t "$t" -X 2>/dev/null || true
        for c in INPUT FORWARD OUTPUT PREROUTING POSTROUTING; do
          iptables -t "$t" -P "$c" ACCEPT 2>/dev/null || true
        done
      fi
    done
    iptables-restore < "$state/iptables.before" || echo "warning: could not restore iptables" >&2
  fi
  [[ -f "$state/docker0.before" ]] || ip link del docker0 2>/dev/null || true
  echo self-stopped > "$state/owner"
  echo "stopped"
  ;;
*) echo "usage: $0 start|stop STATE_DIR" >&2; exit 2 ;;
esac
