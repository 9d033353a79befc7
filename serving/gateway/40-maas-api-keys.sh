#!/bin/sh
# The nginx image's start-up hook (/docker-entrypoint.d/) for the MaaS gateway in docker-compose: turns
# the API key file (MAAS_GATEWAY_KEYS_FILE, one "name:key" per line) into the map entries nginx.conf
# includes (GATEWAY_KEYS_MAP), as serving/gateway.py does on the local stack. The image has no Python,
# hence this awk twin; both accept the same lines. Keys never reach the container's log.
set -eu

keys_file="${MAAS_GATEWAY_KEYS_FILE:-/run/secrets/maas_api_keys}"
map_file="${GATEWAY_KEYS_MAP:-/etc/nginx/maas/api_keys.conf}"

if [ ! -r "$keys_file" ]; then
    echo "$0: the API key file $keys_file is missing or unreadable: mount one (name:key per line)" >&2
    exit 1
fi
umask 077
mkdir -p "$(dirname "$map_file")"
trap 'rm -f "$map_file.tmp"' EXIT
awk -v source="$keys_file" '
    /^[ \t]*(#|$)/ { next }
    {
        line = $0
        sub(/^[ \t]+/, "", line); sub(/[ \t\r]+$/, "", line)
        split_at = index(line, ":")
        name = substr(line, 1, split_at - 1); key = substr(line, split_at + 1)
        if (split_at == 0 || name !~ /^[A-Za-z0-9._-]+$/ || length(name) > 64 || key !~ /^[A-Za-z0-9_-]+$/ || length(key) < 16 || length(key) > 256) {
            printf "%s line %d is not name:key (name: letters, digits, . _ -; key: 16 to 256 letters, digits, _ -)\n", source, NR > "/dev/stderr"
            failed = 1
            exit 1
        }
        if ((name in names) || (key in keys)) {
            printf "%s line %d repeats a key name or a key; give each client its own\n", source, NR > "/dev/stderr"
            failed = 1
            exit 1
        }
        names[name] = 1; keys[key] = 1
        printf "\"~^%s$\" %s;\n", key, name
        count++
    }
    END { if (!failed && count == 0) { printf "%s holds no key\n", source > "/dev/stderr"; exit 1 } }
' "$keys_file" > "$map_file.tmp"
mv "$map_file.tmp" "$map_file"
echo "$0: $(grep -c . "$map_file") API key(s) from $keys_file"
