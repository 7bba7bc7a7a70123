#!/bin/sh
# Creates compose's secrets once, with random values: the Redis password, the Redis URL that
# carries it (GENQ_REDIS_URL_FILE), the sentinels' password (compose/ha.yaml), the webhook signing
# key, the gateways' API keys (one key with every scope, GENQ_API_KEYS_FILE; add your clients' keys
# there) and Grafana's admin password.
# Existing files are kept. The files are readable by the containers' users (genq runs as
# uid 10001, Redis as 999); the folder itself is private.
set -eu
cd "$(dirname "$0")/secrets"
chmod 700 .
random() { od -An -N24 -tx1 /dev/urandom | tr -d ' \n'; }
create() {
  if [ ! -s "$1" ]; then
    printf '%s\n' "$2" > "$1"
    chmod 644 "$1"
    echo "created compose/secrets/$1"
  fi
}
create redis_password "$(random)"
create redis_url "redis://:$(cat redis_password)@redis:6379/0"
create redis_sentinel_password "$(random)"
create webhook_secret "$(random)"
create api_keys "{\"sk-$(random)\": {\"name\": \"operator\", \"scopes\": [\"generate\", \"read\", \"admin\"]}}"
create grafana_admin_password "$(random)"
