#!/usr/bin/env bash
# Make the certificates for an edgeship Mosquitto broker with openssl (1.1.1 or 3.x):
# one CA, one broker (server) certificate, and one client certificate per identity.
# All keys are EC P-256. See README.md for where each file goes.
#
#   gen-certs.sh ca                                  # ca.key, ca.crt (once)
#   gen-certs.sh server broker.example.org [SAN...]  # server.key, server.crt (DNS names / IPs)
#   gen-certs.sh client device-1 device-2 ...        # <id>.key, <id>.crt per identity
#   gen-certs.sh client edgeship-server edgeship-fleet
#
# Environment: PKI_DIR (default ./pki), CA_DAYS (1825), SERVER_DAYS (397), CLIENT_DAYS (397),
# CA_NAME (edgeship-ca).
#
# The client certificate's CN is the identity the broker's ACL sees (use_identity_as_username),
# so it must be the device id ([A-Za-z0-9._-]{1,64}); edgeship-server and edgeship-fleet are
# reserved for the block server and the fleet tool. Existing files are never overwritten.
# Keep ca.key off the broker: the broker needs only ca.crt, server.crt and server.key.
set -euo pipefail
umask 077

PKI_DIR=${PKI_DIR:-./pki}
CA_DAYS=${CA_DAYS:-1825}
SERVER_DAYS=${SERVER_DAYS:-397}
CLIENT_DAYS=${CLIENT_DAYS:-397}
CA_NAME=${CA_NAME:-edgeship-ca}

die() { echo "gen-certs.sh: $*" >&2; exit 2; }
usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

new_key() {  # new_key PATH
  [ -e "$1" ] && die "$1 exists; remove it first if you mean to replace it"
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1"
}

need_ca() {
  [ -f "$PKI_DIR/ca.key" ] && [ -f "$PKI_DIR/ca.crt" ] || die "no CA in $PKI_DIR: run '$0 ca' first"
}

sign() {  # sign NAME CN DAYS EXTFILE: CSR for NAME.key, signed by the CA, to NAME.crt
  local name=$1 cn=$2 days=$3 ext=$4
  openssl req -new -key "$PKI_DIR/$name.key" -subj "/CN=$cn" -out "$PKI_DIR/$name.csr"
  if ! out=$(openssl x509 -req -in "$PKI_DIR/$name.csr" -CA "$PKI_DIR/ca.crt" -CAkey "$PKI_DIR/ca.key" \
      -set_serial "0x$(openssl rand -hex 16)" -days "$days" -sha256 -extfile "$ext" \
      -out "$PKI_DIR/$name.crt" 2>&1); then
    echo "$out" >&2
    die "signing $name failed"
  fi
  rm -f "$PKI_DIR/$name.csr" "$ext"
  chmod 644 "$PKI_DIR/$name.crt"
  echo "$PKI_DIR/$name.crt (CN=$cn, $days days)"
}

cmd=${1:-}
[ $# -gt 0 ] && shift

case "$cmd" in
  ca)
    [ $# -eq 0 ] || usage
    mkdir -p "$PKI_DIR"
    new_key "$PKI_DIR/ca.key"
    openssl req -x509 -new -key "$PKI_DIR/ca.key" -subj "/CN=$CA_NAME" -days "$CA_DAYS" -sha256 \
      -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
      -addext "keyUsage=critical,keyCertSign,cRLSign" \
      -addext "subjectKeyIdentifier=hash" \
      -out "$PKI_DIR/ca.crt"
    chmod 644 "$PKI_DIR/ca.crt"
    echo "$PKI_DIR/ca.crt (CN=$CA_NAME, $CA_DAYS days); keep $PKI_DIR/ca.key offline"
    ;;
  server)
    [ $# -ge 1 ] || usage
    need_ca
    san=""
    for n in "$@"; do
      if [[ $n =~ ^[0-9.]+$ || $n == *:* ]]; then san+="IP:$n,"; else san+="DNS:$n,"; fi
    done
    new_key "$PKI_DIR/server.key"
    ext=$(mktemp)
    cat >"$ext" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=${san%,}
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
EOF
    sign server "$1" "$SERVER_DAYS" "$ext"
    ;;
  client)
    [ $# -ge 1 ] || usage
    for id in "$@"; do
      [[ $id =~ ^[A-Za-z0-9._-]{1,64}$ ]] || die "bad identity '$id': must match [A-Za-z0-9._-]{1,64}"
    done
    need_ca
    for id in "$@"; do
      new_key "$PKI_DIR/$id.key"
      ext=$(mktemp)
      cat >"$ext" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
EOF
      sign "$id" "$id" "$CLIENT_DAYS" "$ext"
    done
    ;;
  *)
    usage
    ;;
esac
