#!/bin/sh
# Snapshots of genq's Redis and their restore, run from the Redis image (redis-cli and
# redis-server) by the backup CronJob, the restore Job and compose's redis-backup and
# redis-restore services. The procedure: docs/operations.md, "Redis: persistence, backup and
# restore". `genq backup` and `genq restore` are the same steps for `genq run`.
#
#   redis-backup.sh backup            one snapshot into BACKUP_DIR, then keep the newest KEEP
#   redis-backup.sh every SECONDS     a backup every SECONDS (compose's service)
#   redis-backup.sh restore [NAME]    NAME (default: the newest) becomes the data in DATA_DIR;
#                                     Redis must be stopped
#   redis-backup.sh list              the snapshots, with their sizes
#   redis-backup.sh fresh SECONDS     succeeds if the newest is younger than twice SECONDS
#
# Settings: REDIS_HOST (genq-redis), REDIS_PORT (6379), REDIS_PASSWORD_FILE or REDISCLI_AUTH,
# BACKUP_DIR (/backups), KEEP (24), DATA_DIR (/data), RESTORE_SNAPSHOT (a NAME, for the Job).
set -eu

BACKUP_DIR=${BACKUP_DIR:-/backups}
DATA_DIR=${DATA_DIR:-/data}
# Snapshots hold every prompt and result: readable by their owner only.
umask 077

say() { echo "redis-backup: $*" >&2; }
die() { say "$*"; exit 1; }
is_rdb() { [ "$(head -c 5 "$1" 2>/dev/null)" = REDIS ]; }
# Names sort as their times do: genq-20261208T031500Z.rdb.
listed() { ls -1 "$BACKUP_DIR" | grep -E '^genq-[0-9]{8}T[0-9]{6}Z\.rdb$' || true; }

backup() {
  if [ -n "${REDIS_PASSWORD_FILE:-}" ]; then
    # In the environment, not on the command line that `ps` shows.
    REDISCLI_AUTH=$(cat "$REDIS_PASSWORD_FILE")
    export REDISCLI_AUTH
  fi
  keep=${KEEP:-24}
  [ "$keep" -ge 1 ] || die "KEEP must be 1 or more"
  mkdir -p "$BACKUP_DIR"
  name="genq-$(date -u +%Y%m%dT%H%M%SZ).rdb"
  [ ! -e "$BACKUP_DIR/$name" ] || die "$name exists: one snapshot per second at most"
  # Under a name that `listed` skips until complete: a cut-short snapshot never counts as one.
  part="$BACKUP_DIR/.$name.part"
  if ! redis-cli -h "${REDIS_HOST:-genq-redis}" -p "${REDIS_PORT:-6379}" --rdb "$part" >&2 \
    || ! is_rdb "$part"; then
    rm -f "$part"
    die "no snapshot taken"
  fi
  mv "$part" "$BACKUP_DIR/$name"
  excess=$(($(listed | wc -l) - keep))
  if [ "$excess" -gt 0 ]; then
    listed | sort | head -n "$excess" | while read -r old; do
      rm -f "$BACKUP_DIR/$old"
      say "deleted $old"
    done
  fi
  say "took $name; kept, with their sizes:"
  (cd "$BACKUP_DIR" && listed | sort | xargs ls -l) >&2
}

# A redis-server of this script's own on a socket in a private directory, for the restore.
start_local() {
  redis-server --port 0 --unixsocket "$tmp/redis.sock" --dir "$DATA_DIR" --save "" \
    --appendonly "$1" --logfile "$tmp/redis.log" &
  pid=$!
  wait_for answers
  # INFO answers while the data loads; other commands wait for it.
  wait_for loaded
}
# Until "$@" succeeds; no time limit (a large snapshot loads for minutes): the Job has its own.
wait_for() {
  until "$@"; do
    kill -0 "$pid" 2>/dev/null || { cat "$tmp/redis.log" >&2; die "redis-server exited"; }
    sleep 0.1
  done
}
answers() { [ "$(cli ping 2>&1)" = PONG ]; }
loaded() { [ "$(field loading)" = 0 ]; }
rewritten() { [ "$(field aof_rewrite_in_progress)$(field aof_rewrite_scheduled)" = 00 ]; }
cli() { redis-cli -s "$tmp/redis.sock" "$@"; }
field() { cli info "${2:-persistence}" | tr -d '\r' | sed -n "s/^$1://p"; }
# Keys without a TTL: the count that cannot change by itself between two looks.
persistent_keys() {
  db=$(field db0 keyspace)
  keys=$(echo "$db" | sed -n 's/^keys=\([0-9]*\).*/\1/p')
  expires=$(echo "$db" | sed -n 's/.*expires=\([0-9]*\).*/\1/p')
  echo $((${keys:-0} - ${expires:-0}))
}
stop_local() {
  cli shutdown >/dev/null 2>&1 || true
  wait "$pid" || true
}

restore() {
  name=${1:-${RESTORE_SNAPSHOT:-}}
  [ -n "$name" ] || name=$(listed | sort | tail -n 1)
  [ -n "$name" ] || die "no snapshot in $BACKUP_DIR"
  case $name in
    */*) die "give a snapshot's name in $BACKUP_DIR, not a path" ;;
  esac
  is_rdb "$BACKUP_DIR/$name" || die "$BACKUP_DIR/$name is not a Redis snapshot"
  mkdir -p "$DATA_DIR"
  # What Redis would load instead (its append-only file wins over dump.rdb) is set aside, not
  # deleted: delete it once the restore is checked.
  aside="$DATA_DIR/before-restore-$(date -u +%Y%m%dT%H%M%SZ)"
  for f in appendonlydir appendonly.aof dump.rdb; do
    if [ -e "$DATA_DIR/$f" ]; then
      mkdir -p "$aside"
      mv "$DATA_DIR/$f" "$aside/"
    fi
  done
  cp "$BACKUP_DIR/$name" "$DATA_DIR/dump.rdb"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  unset REDISCLI_AUTH  # the local server has no password: its socket is in a private directory
  # With appendonly yes and no append-only file, Redis starts empty and ignores dump.rdb. So:
  # load the snapshot with it off, turn it on (a new append-only file is written from memory),
  # stop, and check that Redis started as the deployments start it loads the same data.
  start_local no
  expected=$(persistent_keys)
  cli config set appendonly yes >/dev/null
  wait_for rewritten
  [ "$(field aof_last_bgrewrite_status)" = ok ] \
    || die "no append-only file written: $(cat "$tmp/redis.log")"
  stop_local
  start_local yes
  found=$(persistent_keys)
  stop_local
  [ "$found" = "$expected" ] \
    || die "the append-only file holds $found keys without a TTL, not $expected"
  say "restored $name ($expected keys without a TTL); start Redis"
  [ ! -d "$aside" ] || say "what it replaced is in $aside"
}

fresh() {
  newest=$(listed | sort | tail -n 1)
  [ -n "$newest" ] || die "no snapshot in $BACKUP_DIR"
  age=$(($(date +%s) - $(stat -c %Y "$BACKUP_DIR/$newest")))
  [ "$age" -lt $((2 * $1)) ] || die "the newest snapshot, $newest, is $age s old"
}

case ${1:-} in
  backup) backup ;;
  list) (cd "$BACKUP_DIR" && listed | sort | xargs -r ls -l) ;;
  fresh) fresh "${2:?fresh SECONDS}" ;;
  every)
    [ -n "${2:-}" ] || die "every SECONDS"
    while :; do
      (backup) || say "backup failed; next try in $2 s"
      sleep "$2"
    done
    ;;
  restore) restore "${2:-}" ;;
  *) die "usage: redis-backup.sh backup | every SECONDS | restore [NAME] | list | fresh SECONDS" ;;
esac
