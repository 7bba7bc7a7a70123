#!/bin/sh
# genq's Redis with Sentinel: one script for the data nodes and the sentinels, in Kubernetes
# (k8s/components/redis-ha) and in compose (compose/ha.yaml, which mounts an identical copy).
# docs/operations.md, "High availability: deploying it", describes the setup.
#
#   redis-ha.sh redis      start a data node: the primary, or a replica of the primary
#   redis-ha.sh sentinel   start a sentinel watching the primary
#   redis-ha.sh ready      exit 0 if this data node is the primary, or a replica in sync with it
#   redis-ha.sh handover   before this data node stops: if it is the primary, have a sentinel
#                          promote a replica first (clients wait for a promotion, not for
#                          down-after-milliseconds and an election)
#
# The primary is the data node the sentinels name. When no sentinel names one (the very first
# start, or every sentinel restarting at once), it is the first of REDIS_NODES.
#
# Environment:
#   ANNOUNCE                this node's host:port, as the others reach it
#   REDIS_NODES             the data nodes, host:port each, separated by spaces
#   SENTINELS               the sentinels, host:port each
#   REDIS_PASSWORD_FILE     the data nodes' password
#   SENTINEL_PASSWORD_FILE  the sentinels' password
#   REDIS_CONF              the data nodes' configuration files, read in turn
#   SENTINEL_CONF           the sentinels' configuration, `@PRIMARY@` standing for the primary
#   RUN_DIR                 where the configurations with the passwords go (default /tmp)
#   HANDOVER_WAIT_S         how long a handover waits for the promotion (default 20)
set -eu
umask 077

# The primary's name in Sentinel: sentinel.conf and GENQ_REDIS_SENTINEL_SERVICE say the same.
SERVICE=genq
RUN_DIR=${RUN_DIR:-/tmp}

# cli PASSWORD_FILE HOST:PORT COMMAND...: one command, its reply on stdout, nothing on failure.
cli() {
  password_file=$1
  address=$2
  shift 2
  REDISCLI_AUTH="$(cat "$password_file")" timeout 3 \
    redis-cli -h "${address%:*}" -p "${address##*:}" --raw "$@" 2>/dev/null
}

# named_primary SENTINEL: the data node that sentinel names as the primary, or nothing (an error,
# an unknown name, an address outside the set).
named_primary() {
  named=$(cli "$SENTINEL_PASSWORD_FILE" "$1" sentinel get-master-addr-by-name "$SERVICE" \
    | tr '\n' ':') || true
  for node in $REDIS_NODES; do
    if [ "${named%:}" = "$node" ]; then
      echo "$node"
      return
    fi
  done
}

primary() {
  for sentinel in $SENTINELS; do
    named=$(named_primary "$sentinel")
    if [ -n "$named" ]; then
      echo "$named"
      return
    fi
  done
  # shellcheck disable=SC2086  # the list splits into its nodes
  set -- $REDIS_NODES
  echo "$1"
}

start_redis() {
  leader=$(primary)
  password=$(cat "$REDIS_PASSWORD_FILE")
  # The passwords go into a private copy of the configuration, never into the process list.
  {
    # shellcheck disable=SC2086  # the list splits into its files
    cat $REDIS_CONF
    printf 'port %s\n' "${ANNOUNCE##*:}"
    printf 'requirepass "%s"\nmasterauth "%s"\n' "$password" "$password"
    printf 'replica-announce-ip %s\nreplica-announce-port %s\n' "${ANNOUNCE%:*}" "${ANNOUNCE##*:}"
    if [ "$leader" != "$ANNOUNCE" ]; then
      printf 'replicaof %s %s\n' "${leader%:*}" "${leader##*:}"
    fi
  } > "$RUN_DIR/redis.conf"
  if [ "$leader" = "$ANNOUNCE" ]; then
    echo "redis-ha: $ANNOUNCE starts as the primary"
  else
    echo "redis-ha: $ANNOUNCE starts as a replica of $leader"
  fi
  exec redis-server "$RUN_DIR/redis.conf"
}

start_sentinel() {
  leader=$(primary)
  sentinel_password=$(cat "$SENTINEL_PASSWORD_FILE")
  # Sentinel rewrites its file as it learns the replicas and the other sentinels: a fresh copy
  # at each start, in a writable place.
  {
    sed "s/@PRIMARY@/${leader%:*} ${leader##*:}/" "$SENTINEL_CONF"
    printf 'port %s\n' "${ANNOUNCE##*:}"
    printf 'sentinel announce-ip %s\nsentinel announce-port %s\n' "${ANNOUNCE%:*}" "${ANNOUNCE##*:}"
    printf 'sentinel auth-pass %s "%s"\n' "$SERVICE" "$(cat "$REDIS_PASSWORD_FILE")"
    printf 'requirepass "%s"\nsentinel sentinel-pass "%s"\n' "$sentinel_password" "$sentinel_password"
  } > "$RUN_DIR/sentinel.conf"
  echo "redis-ha: sentinel $ANNOUNCE watches $leader"
  exec redis-server "$RUN_DIR/sentinel.conf" --sentinel
}

ready() {
  info=$(cli "$REDIS_PASSWORD_FILE" "$ANNOUNCE" info replication) || exit 1
  case $info in
    *role:master*) exit 0 ;;
    *master_link_status:up*) exit 0 ;;
    *) exit 1 ;;
  esac
}

is_primary() {
  [ "$(cli "$REDIS_PASSWORD_FILE" "$ANNOUNCE" role | head -n 1)" = master ]
}

handover() {
  is_primary || exit 0
  for sentinel in $SENTINELS; do
    # A sentinel beside this node (a sidecar) is stopping with it: ask the others.
    if [ "${sentinel%:*}" = "${ANNOUNCE%:*}" ]; then
      continue
    fi
    if [ "$(cli "$SENTINEL_PASSWORD_FILE" "$sentinel" sentinel failover "$SERVICE")" = OK ]; then
      waited=0
      while [ "$waited" -lt "${HANDOVER_WAIT_S:-20}" ]; do
        named=$(named_primary "$sentinel")
        if [ -n "$named" ] && [ "$named" != "$ANNOUNCE" ]; then
          # Follow the new primary now, not when the sentinels turn this node into a replica
          # (about 8 s later): clients still connected here get READONLY and ask again.
          cli "$REDIS_PASSWORD_FILE" "$ANNOUNCE" replicaof "${named%:*}" "${named##*:}" >/dev/null || true
          echo "redis-ha: $ANNOUNCE handed the primary over to $named"
          exit 0
        fi
        sleep 1
        waited=$((waited + 1))
      done
      echo "redis-ha: no promotion within ${HANDOVER_WAIT_S:-20} s; stopping as the primary" >&2
      exit 0
    fi
  done
  echo "redis-ha: no sentinel would fail $ANNOUNCE over; stopping as the primary" >&2
}

case ${1:-} in
  redis) start_redis ;;
  sentinel) start_sentinel ;;
  ready) ready ;;
  handover) handover ;;
  *)
    echo "usage: redis-ha.sh redis|sentinel|ready|handover" >&2
    exit 2
    ;;
esac
