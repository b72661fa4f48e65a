#!/bin/sh
# debusine-virt: adapts systemd units to running in an Incus/LXC container.
# Installed by `debusine-virt-incus import`; see its documentation.
set -eu
export LC_ALL=C
out=${1:-/run/systemd/generator}

in_lxc() {
    case ${SYSTEMD_VIRTUALIZATION:-} in
        container:lxc | container:lxc-libvirt) return 0 ;;
        ?*) return 1 ;;
    esac
    tr '\0' '\n' < /proc/1/environ 2>/dev/null | grep -qx 'container=lxc'
}
in_lxc || exit 0

unprivileged() {
    # uid 0 here is not uid 0 of the host, unless the map covers the whole range.
    ! grep -qE '^[[:space:]]*0[[:space:]]+0[[:space:]]+4294967295' /proc/self/uid_map
}

systemd_version=0
for systemd in /usr/lib/systemd/systemd /lib/systemd/systemd; do
    if [ -x "$systemd" ]; then
        systemd_version=$("$systemd" --version 2>/dev/null | sed -n '1s/^systemd \([0-9]*\).*/\1/p')
        break
    fi
done
: "${systemd_version:=0}"

dropin() { # UNIT NAME, content on stdin
    mkdir -p "$out/$1.d"
    cat > "$out/$1.d/$2.conf"
}

mask() {
    [ -e "$out/$1" ] || ln -s /dev/null "$out/$1"
}

# Without nesting Incus gives no /dev/.lxc, and these options cannot be set up.
if [ ! -d /dev/.lxc ]; then
    {
        echo "[Service]"
        [ "$systemd_version" -ge 232 ] && echo "ProtectControlGroups=no"
        [ "$systemd_version" -ge 232 ] && echo "ProtectKernelTunables=no"
        [ "$systemd_version" -ge 239 ] && echo "NoNewPrivileges=no"
        [ "$systemd_version" -ge 247 ] && echo "ProtectProc=default"
        [ "$systemd_version" -ge 247 ] && echo "ProcSubset=all"
        [ "$systemd_version" -ge 249 ] && echo "LoadCredential="
        [ "$systemd_version" -ge 254 ] && echo "PrivateNetwork=no"
        [ "$systemd_version" -ge 256 ] && echo "ImportCredential="
        if ! unprivileged; then
            echo "PrivateDevices=no"
            echo "PrivateTmp=no"
            echo "ProtectHome=no"
            echo "ProtectSystem=no"
            [ "$systemd_version" -ge 232 ] && echo "ProtectKernelModules=no"
            [ "$systemd_version" -ge 244 ] && echo "ProtectKernelLogs=no"
        fi
        true
    } | dropin service debusine-virt-container
    if unprivileged; then
        for unit in systemd-networkd.service systemd-resolved.service; do
            printf '[Service]\nBindReadOnlyPaths=/sys\n' | dropin "$unit" debusine-virt-container
        done
    fi
fi

for unit in dev-hugepages.mount sys-kernel-debug.mount sys-kernel-tracing.mount \
    systemd-journald-audit.socket systemd-modules-load.service systemd-pstore.service \
    systemd-hwdb-update.service systemd-firstboot.service systemd-binfmt.service \
    proc-sys-fs-binfmt_misc.automount; do
    mask "$unit"
done
[ -e /dev/tty1 ] || mask getty@tty1.service

udevadm=
for candidate in /usr/bin/udevadm /bin/udevadm /sbin/udevadm; do
    [ -x "$candidate" ] && { udevadm=$candidate; break; }
done
if [ -n "$udevadm" ]; then
    printf '[Service]\nExecStart=\nExecStart=-%s trigger --type=subsystems --action=add\nExecStart=-%s trigger --type=devices --action=add\n' \
        "$udevadm" "$udevadm" | dropin systemd-udev-trigger.service debusine-virt-container
fi
for sysctl in /usr/lib/systemd/systemd-sysctl /lib/systemd/systemd-sysctl; do
    if [ -x "$sysctl" ]; then
        printf '[Service]\nExecStart=\nExecStart=-%s\n' "$sysctl" | dropin systemd-sysctl.service debusine-virt-container
        break
    fi
done
