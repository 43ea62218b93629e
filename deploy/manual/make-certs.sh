#!/usr/bin/env bash
# Make a private CA and one certificate per name, for a Dask cluster that talks TLS.
#
#   deploy/manual/make-certs.sh OUTDIR [NAME...]        (default names: scheduler worker client)
#
# Writes OUTDIR/ca.pem (give it to everyone: --tls-ca-file), OUTDIR/ca.key (keep it
# private, only needed to sign more certificates) and OUTDIR/NAME.pem + NAME.key for each
# NAME. Every certificate may act as server and client (Dask peers are both). Dask does
# not check host names, only that the peer's certificate is signed by the CA, so one
# certificate per role (or per host) is enough; the subjectAltName lists NAME, localhost
# and 127.0.0.1 for tools that do check.
# Re-running keeps an existing CA (so old certificates stay valid) and re-issues NAMEs.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 OUTDIR [NAME...]" >&2
    exit 2
fi
out=$1
shift
names=("$@")
[[ ${#names[@]} -eq 0 ]] && names=(scheduler worker client)
days=${CERT_DAYS:-825}

command -v openssl >/dev/null || { echo "error: openssl not found; install it (apt-get install openssl)" >&2; exit 1; }
mkdir -p "$out"
umask 077   # keys readable only by their owner

if [[ ! -s "$out/ca.pem" || ! -s "$out/ca.key" ]]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$out/ca.key" -out "$out/ca.pem" -days "$days" -subj "/CN=facecluster-dask-ca" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi

for name in "${names[@]}"; do
    ext=$(mktemp)
    printf '%s\n' "basicConstraints=CA:FALSE" \
        "keyUsage=critical,digitalSignature,keyEncipherment" \
        "extendedKeyUsage=serverAuth,clientAuth" \
        "subjectAltName=DNS:${name},DNS:localhost,IP:127.0.0.1" > "$ext"
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$out/$name.key" -out "$out/$name.csr" -subj "/CN=$name" 2>/dev/null
    openssl x509 -req -in "$out/$name.csr" -CA "$out/ca.pem" -CAkey "$out/ca.key" -CAcreateserial \
        -out "$out/$name.pem" -days "$days" -extfile "$ext" 2>/dev/null
    rm -f "$out/$name.csr" "$ext"
    openssl verify -CAfile "$out/ca.pem" "$out/$name.pem" >/dev/null
done
chmod 644 "$out/ca.pem" "$out"/*.pem
echo "certificates in $out: ca.pem $(printf '%s.pem/.key ' "${names[@]}")"
