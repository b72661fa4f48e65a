# shellcheck shell=sh
# Run as `sh -c SCRIPT sh PATH` with the wrapper on stdin: installs it at PATH, for root only.
set -e
# Only the last directory is new (/var/lib is there): it is the one made 0700.
# shellcheck disable=SC2174
mkdir -p -m 0700 "${1%/*}"
cat > "$1.new"
chmod 0700 "$1.new"
mv -f "$1.new" "$1"
