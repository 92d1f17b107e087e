#!/bin/sh
# Workspace agent for the busybox image (workspace-agent:dev): registers the workspace with the
# platform, then heartbeats. The POSIX sh twin of workspace_agent.py, same environment and exit
# codes, so templates behave alike on the docker and process backends.
#
# Environment: WORKSPACE_ID, WORKSPACE_TOKEN, PLATFORM_URL (set by the platform); optional
# AGENT_HEARTBEAT_SECONDS (default 5), AGENT_BOOT_DELAY_SECONDS (a slow runtime's boot),
# AGENT_IGNORE_SIGTERM=1 (for testing slow stops).
#
# Activity (the idle auto-stop policy): a heartbeat carries "active": true when the file
# AGENT_ACTIVITY_FILE (default $WORKSPACE_CONFIG_DIR/.activity) was touched since the previous
# heartbeat; anything in the workspace may touch it to say "in use".
#
# The app: with WORKSPACE_APP_PORT set, runs WORKSPACE_APP_COMMAND (sh -c) or, without one,
# busybox httpd serving /www on that port (on WORKSPACE_APP_HOST, default 127.0.0.1); registers only once
# http://127.0.0.1:$WORKSPACE_APP_PORT$WORKSPACE_APP_HEALTH_PATH answers, and reports each
# heartbeat healthy only while it still does (the platform shows degraded otherwise).
#
# Exit codes: 0 on SIGTERM; 3 when the platform rejects the token (401/403/404/410: a newer
# cycle replaced this one, or the workspace is gone), so a stale instance never lingers.
# The token travels only in the Authorization header, never in a log line.

EXIT_REJECTED=3
boot_delay=${AGENT_BOOT_DELAY_SECONDS:-0}
tmp=${TMPDIR:-/tmp}/agent.$$
child=""
app_pid=""

log() {
  echo "$(date +%Y-%m-%dT%H:%M:%S) agent: $*"
}

on_term() {
  log "SIGTERM received, exiting"
  [ -n "$child" ] && kill "$child" 2>/dev/null
  [ -n "$app_pid" ] && kill "$app_pid" 2>/dev/null
  rm -f "$tmp.out" "$tmp.err" "$tmp.in" "$tmp.raw"
  exit 0
}

# As PID 1 in a container a signal without a handler is ignored: the trap is what makes
# `docker stop` end the agent at once instead of after the grace period.
if [ "${AGENT_IGNORE_SIGTERM:-0}" = 1 ]; then
  trap '' TERM
else
  trap on_term TERM
fi
trap on_term INT

# Children run in the background and the shell waits for them, so a SIGTERM interrupts the
# wait at once (a foreground child would delay the trap until it finished).
pause() {
  sleep "$1" &
  child=$!
  wait "$child"
  child=""
}

# A warm pool's member (WORKSPACE_POOL=1) boots before anyone asks, then waits for the platform
# to write its claim (identity, token, env as `export NAME='value'` lines, ending with
# claim_complete=1) to WORKSPACE_CLAIM_FILE and send SIGUSR1, which ends the current pause. The
# pause's bound is a backstop for a signal that came between the check and the pause.
if [ "${WORKSPACE_POOL:-0}" = 1 ]; then
  if [ "$boot_delay" != 0 ]; then
    log "booting for ${boot_delay}s"
    pause "$boot_delay"
    boot_delay=0
  fi
  # The platform writes it into the config volume when it can reach the volume on the engine's
  # host, into this container's /tmp otherwise: either is complete once it ends with the mark.
  claim_file=""
  trap '[ -n "$child" ] && kill "$child" 2>/dev/null' USR1
  log "pool member ready, waiting for a claim"
  while [ -z "$claim_file" ]; do
    for candidate in "${WORKSPACE_CONFIG_DIR:-/nonexistent}/.workspace-claim" \
      "${WORKSPACE_CLAIM_FILE:-/tmp/.workspace-claim}"; do
      if grep -qx 'claim_complete=1' "$candidate" 2>/dev/null; then
        claim_file=$candidate
      fi
    done
    [ -n "$claim_file" ] || pause 2
  done
  trap '' USR1
  . "$claim_file"
  rm -f "$claim_file"
  unset WORKSPACE_POOL claim_complete
  log "claimed"
fi
base=${PLATFORM_URL%/}
interval=${AGENT_HEARTBEAT_SECONDS:-5}

for name in WORKSPACE_ID WORKSPACE_TOKEN PLATFORM_URL; do
  eval "value=\${$name:-}"
  if [ -z "$value" ]; then
    log "$name is not set"
    exit 2
  fi
done

start_app() {
  [ -n "${WORKSPACE_APP_PORT:-}" ] || return 0
  if [ -n "${WORKSPACE_APP_COMMAND:-}" ]; then
    log "starting the app on port $WORKSPACE_APP_PORT"
    sh -c "$WORKSPACE_APP_COMMAND" &
  else
    log "serving /www on port $WORKSPACE_APP_PORT"
    httpd -f -p "${WORKSPACE_APP_HOST:-127.0.0.1}:$WORKSPACE_APP_PORT" -h /www &
  fi
  app_pid=$!
}

# The HTTP client. Under gVisor (WORKSPACE_SANDBOX=gvisor, runsc with its host network), a
# read() on a blocking socket answers EAGAIN instead of waiting when no data has arrived yet
# (recv() and poll() behave), so busybox wget, which reads the answer through stdio, fails with
# "Resource temporarily unavailable" whenever the server has not answered at once. nc polls
# before it reads, so there the agent speaks HTTP/1.0 through nc; elsewhere wget, as before.
http_client=wget
if [ "${WORKSPACE_SANDBOX:-}" = gvisor ]; then
  http_client=nc
  cr=$(printf '\r')
  # nc's stdin, made once: see nc_http.
  rm -f "$tmp.in"
  mkfifo -m 600 "$tmp.in" || exit 2
fi

# nc_http METHOD URL [BODY]: one HTTP/1.0 exchange through nc (BODY as JSON, with the bearer
# token). Sets $answer (the status line) and $status (its code; both empty without an answer),
# leaves nc's complaints in $tmp.err; returns nc's exit status. nc's stdin is a fifo this shell
# holds open until nc ends: a request followed by EOF would half-close the connection, and the
# registry listener drops such a request unanswered. nc ends when the server closes its side
# (HTTP/1.0), so nothing polls or sleeps. Once both ends are closed the kernel drops whatever nc
# did not send (it could not connect), so no request outlives its call. Shell builtins only,
# besides timeout and nc: every process costs the sandbox a fork and an exec.
nc_http() {
  rest=${2#http://}
  case $rest in
    */*) path=/${rest#*/} hostport=${rest%%/*} ;;
    *) path=/ hostport=$rest ;;
  esac
  port=${hostport##*:}
  [ "$port" = "$hostport" ] && port=80
  # Opened for reading and writing, so the open waits for nobody.
  exec 3<>"$tmp.in"
  if [ -n "${3:-}" ]; then
    printf '%s %s HTTP/1.0\r\nHost: %s\r\nAuthorization: Bearer %s\r\n%s\r\n%s\r\n\r\n%s' \
      "$1" "$path" "$hostport" "$WORKSPACE_TOKEN" "Content-Type: application/json" \
      "Content-Length: ${#3}" "$3" >&3
  else
    printf '%s %s HTTP/1.0\r\nHost: %s\r\n\r\n' "$1" "$path" "$hostport" >&3
  fi
  timeout 10 nc -w 10 "${hostport%:*}" "$port" <"$tmp.in" >"$tmp.raw" 2>"$tmp.err" 3>&- &
  child=$!
  wait "$child"
  rc=$?
  child=""
  exec 3>&-
  answer=""
  read -r answer <"$tmp.raw"
  answer=${answer%"$cr"}
  status=${answer#* }
  status=${status%% *}
  [ "$status" = "$answer" ] && status=""
  return "$rc"
}

# app_answers: 0 when there is no app or its health path answers below 400.
app_answers() {
  [ -n "${WORKSPACE_APP_PORT:-}" ] || return 0
  if [ "$http_client" = nc ]; then
    nc_http GET "http://127.0.0.1:$WORKSPACE_APP_PORT${WORKSPACE_APP_HEALTH_PATH:-/}"
    case $status in
      [123]??) return 0 ;;
    esac
    return 1
  fi
  timeout 5 wget -q -O /dev/null \
    "http://127.0.0.1:$WORKSPACE_APP_PORT${WORKSPACE_APP_HEALTH_PATH:-/}" 2>/dev/null &
  child=$!
  wait "$child"
  rc=$?
  child=""
  return "$rc"
}

# post PATH [EXTRA]: POST {"workspace_id": ...EXTRA} with the bearer token. Sets $reply (the body,
# under gVisor the status line; or why not) and returns 0 when accepted, 1 when rejected (stop for
# good), 2 when worth retrying.
post() {
  if [ "$http_client" = nc ]; then
    nc_http POST "$base$1" "{\"workspace_id\": \"$WORKSPACE_ID\"${2:-}}"
    rc=$?
    case $status in
      2??)
        reply=$answer
        return 0
        ;;
      401 | 403 | 404 | 410)
        reply="server returned error: $answer"
        return 1
        ;;
      "") reply=$(cat "$tmp.err" 2>/dev/null) ;;
      *) reply="server returned error: $answer" ;;
    esac
    [ -n "$reply" ] || reply="nc exited with $rc"
    return 2
  fi
  timeout 10 wget -q -O "$tmp.out" \
    --header "Authorization: Bearer $WORKSPACE_TOKEN" \
    --header "Content-Type: application/json" \
    --post-data "{\"workspace_id\": \"$WORKSPACE_ID\"${2:-}}" \
    "$base$1" 2>"$tmp.err" &
  child=$!
  wait "$child"
  rc=$?
  child=""
  if [ "$rc" -eq 0 ]; then
    reply=$(cat "$tmp.out" 2>/dev/null)
    return 0
  fi
  reply=$(cat "$tmp.err" 2>/dev/null)
  [ -n "$reply" ] || reply="wget exited with $rc"
  case "$reply" in
    *" 401 "* | *" 403 "* | *" 404 "* | *" 410 "*) return 1 ;;
  esac
  return 2
}

if [ "$boot_delay" != 0 ]; then
  log "booting for ${boot_delay}s"
  pause "$boot_delay"
fi

# pause_ms MS: pause for MS milliseconds.
pause_ms() {
  pause "$(($1 / 1000)).$(printf %03d $(($1 % 1000)))"
}

start_app
# Online means the app answers too: register only once its health path does. The first checks
# come quickly (an httpd is listening within milliseconds), then every 0.5 s.
delay_ms=50
while ! app_answers; do
  pause_ms "$delay_ms"
  delay_ms=$((delay_ms * 2))
  [ "$delay_ms" -gt 500 ] && delay_ms=500
done

# The engine filled the config volume from the template's config image (it was empty): say so
# at registration (the platform records a recovery when the workspace had registered before),
# then drop the flag.
copied_flag="${WORKSPACE_CONFIG_DIR:-/nonexistent}/.config-copied"
copied=""
[ -f "$copied_flag" ] && copied=', "config_copied": true'

# Register with exponential backoff: 0.05 s doubling to 5 s, until accepted or rejected. The
# first retry comes soon: a container whose network link the worker wires once it runs
# (DOCKER_NETWORK_MODE=veth) may make its first call a few milliseconds before the link exists.
delay_ms=50
while :; do
  post /api/registry/register "$copied"
  case $? in
    0)
      log "registered workspace $WORKSPACE_ID${copied:+ (config copied from the template)}"
      [ -n "$copied" ] && rm -f "$copied_flag"
      break
      ;;
    1)
      log "registration rejected: $reply"
      exit "$EXIT_REJECTED"
      ;;
  esac
  log "registration not accepted yet: $reply"
  pause_ms "$delay_ms"
  delay_ms=$((delay_ms * 2))
  [ "$delay_ms" -gt 5000 ] && delay_ms=5000
done

activity_file=${AGENT_ACTIVITY_FILE:-}
if [ -z "$activity_file" ] && [ -n "${WORKSPACE_CONFIG_DIR:-}" ]; then
  activity_file="$WORKSPACE_CONFIG_DIR/.activity"
fi
# The file's modification time to the nanosecond; empty when there is no such file.
activity_mark() {
  [ -n "$activity_file" ] && stat -c %y "$activity_file" 2>/dev/null
}
activity_seen=$(activity_mark)

while :; do
  pause "$interval"
  healthy=true
  app_answers || healthy=false
  mark=$(activity_mark)
  active=false
  if [ -n "$mark" ] && [ "$mark" != "$activity_seen" ]; then active=true; fi
  activity_seen=$mark
  post /api/registry/heartbeat ", \"healthy\": $healthy, \"active\": $active"
  case $? in
    1)
      log "heartbeat rejected: $reply"
      exit "$EXIT_REJECTED"
      ;;
    2) log "heartbeat failed: $reply" ;;
  esac
done
