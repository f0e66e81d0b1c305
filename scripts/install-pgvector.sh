#!/usr/bin/env bash
# Builds pgvector for the machine's PostgreSQL when it is missing.
# Debian bookworm ships no pgvector package, so we build Debian trixie's source package
# against postgresql-server-dev-<major>. Safe to run any number of times.
set -euo pipefail

pg_major=${PG_MAJOR:-$(ls /etc/postgresql 2>/dev/null | sort -n | tail -n 1)}
pg_major=${pg_major:-15}
control=/usr/share/postgresql/$pg_major/extension/vector.control
if [ -f "$control" ]; then
  echo "pgvector: already installed for PostgreSQL $pg_major"
  exit 0
fi

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq "postgresql-server-dev-$pg_major" dpkg-dev make gcc >/dev/null

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/parts" "$work/lists/partial"
# Reuse the mirror the machine already uses, so no host name is hard-coded here.
uri=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
if [ -z "$uri" ]; then
  uri=$(awk '$1=="deb"{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
fi
printf 'Types: deb-src\nURIs: %s\nSuites: trixie\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$uri" > "$work/parts/trixie.sources"
O="-o Dir::Etc::sourcelist=/dev/null -o Dir::Etc::sourceparts=$work/parts -o Dir::State::Lists=$work/lists"
(cd "$work" && apt-get $O update -qq && apt-get $O source -qq --download-only pgvector && dpkg-source -x --no-check ./pgvector_*.dsc pgvector-src >/dev/null)
pg_config=/usr/lib/postgresql/$pg_major/bin/pg_config
make -s -C "$work/pgvector-src" PG_CONFIG="$pg_config" >/dev/null
$SUDO make -s -C "$work/pgvector-src" PG_CONFIG="$pg_config" install >/dev/null

# Installing the server-dev package can upgrade the server packages and stop the cluster.
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  $SUDO pg_ctlcluster --skip-systemctl-redirect "$pg_major" main start || true
fi
for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
echo "pgvector: installed for PostgreSQL $pg_major"
