# shellcheck shell=sh
# Run as `sh -c LAUNCHER sh PROGRAM ARG...`: starts PROGRAM in a transient systemd unit when the
# guest runs systemd (outside the agent's cgroup), else in place.
if [ -d /run/systemd/system ] && command -v systemd-run >/dev/null 2>&1 &&
    systemd-run --quiet --collect --unit="debusine-virt-helper-$$" \
        --description="debusine-virt guest helper" "$@"; then
    exit 0
fi
exec "$@"
